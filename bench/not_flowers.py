"""Twelve images that show none of the five flowers, for measuring what "not sure" does with them.

    python bench/not_flowers.py /tmp/not_flowers && python predict.py /tmp/not_flowers

What the installed packages ship plus synthetic ones, never tuned to: matplotlib's three sample pictures
(grace_hopper.jpg, logo2.png, Minduka_Present_Blue_Pack.png), four images of uniform noise (320x240, numpy
seed 0) and five flat colours (black, white, grey, green, sky blue). The same twelve on every machine, so
bench/RESULTS.md can compare weights on them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nin

SAMPLE_PICTURES = ("grace_hopper.jpg", "logo2.png", "Minduka_Present_Blue_Pack.png")
NOISE_IMAGES, NOISE_SEED, SIZE = 4, 0, (320, 240)
FLAT_COLOURS = {"black": (0, 0, 0), "white": (255, 255, 255), "grey": (128, 128, 128), "green": (40, 160, 40),
                "sky_blue": (135, 206, 235)}


def main() -> None:
    p = nin.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="folder to write the twelve images into (made if missing)")
    out = p.parse_args().out
    nin.check_output_folder(out, "OUT")
    samples = Path(matplotlib.get_data_path()) / "sample_data"
    for name in SAMPLE_PICTURES:
        nin.atomic_write(out / name, lambda f, name=name: f.write((samples / name).read_bytes()))
    rng = np.random.default_rng(NOISE_SEED)
    for i in range(NOISE_IMAGES):
        save_png(Image.fromarray(rng.integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8)), out / f"noise_{i}.png")
    for name, colour in FLAT_COLOURS.items():
        save_png(Image.new("RGB", SIZE, colour), out / f"flat_{name}.png")
    print(f"{len(SAMPLE_PICTURES) + NOISE_IMAGES + len(FLAT_COLOURS)} images in {out}")


def save_png(image: Image.Image, path: Path) -> None:
    nin.atomic_write(path, lambda f: image.save(f, format="PNG"))


if __name__ == "__main__":
    nin.run_cli(main)
