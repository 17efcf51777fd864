"""Export trained NiN weights to ONNX, preprocessing and calibration inside, and check the export against predict.py.

    pip install -r requirements-export.txt
    python export.py                                  # NiN.pth -> NiN.onnx
    python export.py --check test_img/*.jpg           # ... and compare it with predict.py on these images

The ONNX graph takes uint8 RGB images [N, S, S, 3], already resized and centre-cropped to the evaluation size S
(what nin.eval_tensor does: resize the short side to round(S / nin.CROP_RATIO), then crop the centre S x S),
normalises them itself and returns calibrated probabilities [N, C], so an app cannot feed it differently
normalised numbers.
The file's metadata holds "classes" (JSON list, in output order), "image_size" S, "temperature" and
"not_sure_below" (answer "not sure" when the top probability is below it). Any batch
size works. --check runs the export with onnxruntime on the images (and on drawn noise and flat colours) before
it is written, and refuses it (writing nothing) unless every top-1 class matches predict.py's and every probability
is within --tolerance; it also times one image through each (the median of repeated runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import nin
import predict

TOLERANCE = 1e-3  # the largest difference in any probability between the export and predict.py
TIMED_RUNS = 21  # --check times one image through each this many times, after one untimed run


class Exported(torch.nn.Module):
    """NiN with its input preprocessing and calibration: uint8 [N, S, S, 3] in, probabilities [N, C] out."""

    def __init__(self, model: torch.nn.Module, temperature: float) -> None:
        super().__init__()
        self.model, self.temperature = model, temperature

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = nin.normalize(images.permute(0, 3, 1, 2))
        return (self.model(x) / self.temperature).softmax(1)


def export(saved: nin.SavedWeights, source: str) -> bytes:
    """The ONNX file's bytes; `source` names the weights in its metadata."""
    import onnx

    image_size, calibration = saved.image_size, saved.calibration
    example = torch.zeros(2, image_size, image_size, 3, dtype=torch.uint8)
    exported = Exported(saved.model, calibration.temperature).eval()
    program = torch.onnx.export(exported, (example,), input_names=["images"],
                                output_names=["probabilities"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                dynamo=True, verbose=False)
    nin.normalization_constants.cache_clear()  # tracing cached its own stand-in tensors there
    graph = program.model_proto
    onnx.helper.set_model_props(graph, {"classes": json.dumps(saved.classes), "image_size": str(image_size),
                                        "temperature": str(calibration.temperature),
                                        "not_sure_below": str(calibration.not_sure_below),
                                        "source": f"{source}, exported by export.py"})
    return graph.SerializeToString()


def check(exported: bytes, saved: nin.SavedWeights, images: list[Path], tolerance: float) -> str:
    """Compare the export with predict.py on the image files and on drawn ones; a one-line report, or CLIError."""
    import onnxruntime

    session = onnxruntime.InferenceSession(exported, providers=["CPUExecutionProvider"])
    model, image_size, temperature = saved.model, saved.image_size, saved.calibration.temperature
    decoded = nin.decode_images(images, nin.eval_tensor, image_size, nin.WORKERS, "decode", progress=False)
    photos = [image for image in decoded if image is not None]  # an unreadable file: skipped with a warning
    if not photos:
        raise nin.CLIError("--check: none of the images could be read")
    generator = torch.Generator().manual_seed(0)
    drawn = [torch.randint(0, 256, (3, image_size, image_size), dtype=torch.uint8, generator=generator)
             for _ in range(4)]
    drawn += [torch.full((3, image_size, image_size), v, dtype=torch.uint8) for v in (0, 128, 255)]
    batch = torch.stack(photos + drawn)
    expected, _ = predict.classify(model, batch, temperature=temperature)
    got = torch.from_numpy(session.run(None, {"images": batch.permute(0, 2, 3, 1).numpy()})[0])
    same_top1 = bool((got.argmax(1) == expected.argmax(1)).all())
    largest = float((got - expected).abs().max())
    report = (f"{len(batch)} images ({len(photos)} photos, {len(drawn)} drawn): top-1 "
              f"{'the same for every one' if same_top1 else 'DIFFERS'}, largest probability difference {largest:.1e}")
    if not same_top1 or largest > tolerance:
        raise nin.CLIError(f"the export does not match predict.py: {report}")
    one = batch[:1]
    onnx_ms = median_ms(lambda: session.run(None, {"images": one.permute(0, 2, 3, 1).numpy()}))
    torch_ms = median_ms(lambda: predict.classify(model, one, temperature=temperature))
    return f"{report}; one image: {onnx_ms:.1f} ms with onnxruntime, {torch_ms:.1f} ms with predict.py's forward pass"


def median_ms(work: Callable[[], object]) -> float:
    """The median wall time of work() in milliseconds, after one untimed call."""
    work()
    times = []
    for _ in range(TIMED_RUNS):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    p = nin.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=nin.WEIGHTS_PATH, help="trained weights (default: %(default)s)")
    p.add_argument("--class-idx", type=Path, default=nin.CLASS_IDX_PATH, help="class map (default: %(default)s)")
    p.add_argument("--out", type=Path, default=nin.ROOT / "NiN.onnx", help="the ONNX file (default: %(default)s)")
    p.add_argument("--check", type=Path, nargs="+", default=None, metavar="IMAGE",
                   help="images (or folders) to compare the export with predict.py on")
    p.add_argument("--tolerance", type=float, default=None,
                   help=f"largest probability difference --check accepts (default: {TOLERANCE})")
    args = p.parse_args()
    if args.tolerance is not None and not args.check:
        p.error("--tolerance is what --check accepts: give it with --check")
    args.tolerance = TOLERANCE if args.tolerance is None else args.tolerance
    if not 0 < args.tolerance < 1:
        p.error("--tolerance must be between 0 and 1")
    nin.check_output_file(args.out, "--out")
    images = predict.expand(args.check or [])  # a path that is not there: refused before the export's seconds
    if args.check and not images:
        raise nin.CLIError("--check: no images in the folders given")
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise nin.CLIError(f"{error.name} is not installed: pip install -r requirements-export.txt") from None
    saved = predict.load_model(args.weights, args.class_idx, torch.device("cpu"))
    exported = export(saved, args.weights.name)
    report = check(exported, saved, images, args.tolerance) if args.check else None
    nin.atomic_write(args.out, lambda f: f.write(exported))  # only an export that passed --check is written
    size = saved.image_size
    print(f"wrote {args.out} ({len(exported) / 2**20:.1f} MiB): uint8 images [N, {size}, {size}, 3] in, "
          f"probabilities of {', '.join(saved.classes)} out")
    if report:
        print(f"check against predict.py: {report}")


if __name__ == "__main__":
    nin.run_cli(main)
