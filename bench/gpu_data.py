"""A copy of a split small enough to send to a lent GPU machine (64 MiB with the repository).

    python bench/gpu_data.py data .gpu/data

Training photos become their centre square at the side train.py caches for --side's image size (JPEG),
which is all that train.py keeps of them anyway; validation photos are copied untouched, so the accuracy
measured there is on the original photos.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torchvision.transforms.v2 import functional as TF

import nin
from train import train_tensor


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("split", type=Path, help="folder holding train/ and val/")
    p.add_argument("out", type=Path, help="where the copy goes (replaced)")
    p.add_argument("--side", type=int, default=nin.IMAGE_SIZE,
                   help="largest training size to serve (default: %(default)s)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the squares (default: %(default)s)")
    args = p.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    shutil.copytree(args.split / "val", args.out / "val")
    for path in sorted((args.split / "train").rglob("*")):
        target = args.out / "train" / path.relative_to(args.split / "train")
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.name == nin.SPLIT_ID_FILE:
            shutil.copy(path, target)
        elif path.is_file():
            square = TF.to_pil_image(train_tensor(str(path), args.side))  # exactly what train.py caches
            square.save(target.with_suffix(".jpg"), quality=args.quality)


if __name__ == "__main__":
    nin.run_cli(main)
