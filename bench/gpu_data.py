"""For maintainers with a borrowed GPU machine: a copy of a photo folder small enough to carry there (64 MiB
with the repository).

    python bench/gpu_data.py ../shared/data/flower_photos .gpu/flower_squares

Every photo of SOURCE/<class>/ becomes its centre square at the side train.py caches for --side (JPEG). For
training that is all train.py keeps of a photo anyway; for scoring, nin.eval_tensor of the square (resize to
the same side: nothing to do, then the same centre crop) equals that of the original photo up to the JPEG
re-encoding. Cross-validation scores every photo, so every photo is squared. OUT is replaced only if this
script wrote it (it leaves a mark there): two paths given the wrong way round must not delete the photos.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torchvision.transforms.v2 import functional as TF

import nin
import split_data
from train import train_tensor

MARK = ".written-by-gpu_data"


def main() -> None:
    p = nin.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="folder of per-class image folders")
    p.add_argument("out", type=Path, help="where the copy goes (replaced)")
    p.add_argument("--side", type=int, default=nin.IMAGE_SIZE,
                   help="largest image size to serve (default: %(default)s)")
    p.add_argument("--quality", type=int, default=85, help="JPEG quality of the squares (default: %(default)s)")
    args = p.parse_args()
    if args.out.resolve().is_relative_to(args.source.resolve()):
        raise nin.CLIError(f"{args.out} is inside {args.source}: it would be read as a class folder")
    classes = split_data.list_classes(args.source)
    if args.out.exists():
        if not (args.out / MARK).is_file():
            raise nin.CLIError(f"{args.out} exists and was not written by this script: give a new folder")
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    (args.out / MARK).touch()  # first: a cut run's folder can be replaced too
    for name, files in classes.items():
        (args.out / name).mkdir()
        for path in files:
            try:
                square = TF.to_pil_image(train_tensor(str(path), args.side))  # exactly what train.py caches
            except nin.UnreadableImage as error:
                nin.warn(f"skipped {error}")
                continue
            jpeg_name = path.name if path.suffix.lower() in (".jpg", ".jpeg") else path.name + ".jpg"  # a.png, a.jpg
            square.save(args.out / name / jpeg_name, quality=args.quality, format="JPEG")
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"wrote {args.out}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    nin.run_cli(main)
