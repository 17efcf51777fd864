"""Classify images with trained NiN weights.

    python predict.py test_img/tulip.jpg
    python predict.py photos/ --top-k 5 --json
    python predict.py test_img/*.jpg --save predictions.png

Prints the top-k classes with probabilities for each image, then shows the images with their predictions
(or saves the figure with --save). Folders are searched recursively for images.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from nin import (
    CLASS_IDX_PATH,
    WEIGHTS_PATH,
    CLIError,
    eval_tensor,
    load_class_names,
    load_weights,
    normalize,
    run_cli,
    warn,
)

TOP_K = 3
FILE_ONLY_BACKENDS = {"agg", "cairo", "pdf", "pgf", "ps", "svg", "template"}
# Folders are searched for these; a file named on the command line is tried whatever its extension.
IMAGE_EXTENSIONS = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", type=Path, help="image files or folders of images")
    p.add_argument("--weights", type=Path, default=WEIGHTS_PATH, help="trained weights (default: %(default)s)")
    p.add_argument("--class-idx", type=Path, default=CLASS_IDX_PATH,
                   help="class map written by train.py (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=TOP_K, help="classes listed per image (default: %(default)s)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if present, else cpu)")
    p.add_argument("--json", action="store_true", help="print the results as JSON, and show no figure")
    p.add_argument("--save", type=Path, default=None, metavar="FILE",
                   help="save the figure (PNG, PDF, ...) instead of showing it")
    args = p.parse_args()
    if args.top_k < 1:
        p.error("--top-k must be at least 1")
    return args


def expand(paths: list[Path]) -> list[Path]:
    """Files as given; folders replaced by the images inside them, sorted."""
    files = []
    for path in paths:
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                warn(f"no images in folder {path}")
            files += found
        elif path.exists():
            files.append(path)
        else:
            raise CLIError(f"image not found: {path}")
    return files


def load_model(weights: Path, class_idx: Path, device: torch.device) -> tuple[torch.nn.Module, list[str], int]:
    model, classes, image_size = load_weights(weights, device)
    names = load_class_names(class_idx)
    if names != classes:
        raise CLIError(f"{class_idx} does not match {weights}: it lists {names}, the weights were trained on "
                       f"{classes}")
    return model, classes, image_size


@torch.no_grad()
def predict(model: torch.nn.Module, image: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Class probabilities for one uint8 image [3, H, W]."""
    return model(normalize(image.unsqueeze(0).to(device))).softmax(1)[0].cpu()


def show_or_save(results: list[dict], images: list[torch.Tensor], save: Path | None) -> None:
    """A grid of the images titled with their top class; shown only where a display exists."""
    import matplotlib.pyplot as plt  # matplotlib falls back to a file-only backend when there is no display

    if save is None and plt.get_backend().lower() in FILE_ONLY_BACKENDS:
        print("no display to show the figure on: use --save FILE to keep it")
        return
    cols = min(len(images), 4)
    rows = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, result, image in zip(axes.flat, results, images, strict=False):
        best = result["top"][0]
        ax.imshow(image.permute(1, 2, 0).numpy())
        ax.set_title(f"{Path(result['image']).name}\n{best['class']} {best['probability']:.0%}", fontsize=9)
    fig.tight_layout()
    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save, dpi=100)
        print(f"saved {save}")
    else:
        plt.show()
    plt.close(fig)


def main() -> None:
    args = parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    files = expand(args.images)
    model, classes, image_size = load_model(args.weights, args.class_idx, device)
    k = min(args.top_k, len(classes))
    results, shown = [], []
    for path in files:
        try:
            image = eval_tensor(path, image_size)
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as error:
            if len(args.images) == 1 and path == args.images[0]:
                raise CLIError(f"cannot read image {path}: {error}") from None
            warn(f"skipped {path}: {error}")
            continue
        probs = predict(model, image, device)
        top = probs.topk(k)
        ranked = zip(top.values.tolist(), top.indices.tolist(), strict=True)
        results.append({"image": str(path), "top": [{"class": classes[i], "probability": round(p, 4)}
                                                     for p, i in ranked]})
        shown.append(image)
    if not results:
        raise CLIError("no image could be read")
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for result in results:
        ranked = ", ".join(f"{t['class']} {t['probability']:.1%}" for t in result["top"])
        print(f"{result['image']}: {ranked}")
    show_or_save(results, shown, args.save)


if __name__ == "__main__":
    run_cli(main)
