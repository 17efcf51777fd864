"""Shared helpers: tiny image folders drawn with PIL, and a way to run the scripts as a user would."""

from __future__ import annotations

import io
import random
import runpy
import shutil
import subprocess
import sys
import traceback
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLOURS = {"blue": (30, 60, 220), "green": (40, 190, 60), "red": (220, 40, 40)}


def draw(path: Path, colour: tuple[int, int, int], seed: int, size: tuple[int, int] = (80, 72),
         mode: str = "RGB") -> Path:
    """A shape of `colour` on a random grey background, different for every seed; saved in `mode`."""
    rng = random.Random(seed)
    grey = rng.randint(90, 170)
    img = Image.new("RGB", size, (grey, grey, grey))
    pen = ImageDraw.Draw(img)
    w, h = size
    x0, y0 = rng.randint(0, w // 3), rng.randint(0, h // 3)
    x1, y1 = rng.randint(2 * w // 3, w), rng.randint(2 * h // 3, h)
    jitter = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in colour)
    (pen.ellipse if seed % 2 else pen.rectangle)((x0, y0, x1, y1), fill=jitter)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "RGB":
        img.save(path)
    elif mode == "I;16":
        Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 257).save(path)  # 16-bit grey
    else:
        img.convert(mode).save(path)
    return path


def mutations(seed: int, count: int, tmp_path) -> list[bytes]:
    """Random bytes, and valid JPEG/PNG files with bytes flipped, cut, repeated or inserted."""
    rng = random.Random(seed)
    originals = [draw(tmp_path / f"o{i}{suffix}", (rng.randrange(256), 90, 30), seed=i, size=(70, 66)).read_bytes()
                 for i, suffix in enumerate([".jpg", ".png", ".jpg"])]
    cases = [bytes(rng.randrange(256) for _ in range(rng.randrange(0, 400))) for _ in range(count // 5)]
    while len(cases) < count:
        data = bytearray(rng.choice(originals))
        for _ in range(rng.randint(1, 12)):
            op, at = rng.randrange(4), rng.randrange(len(data))
            if op == 0:
                data[at] = rng.randrange(256)
            elif op == 1:
                del data[at:]
            elif op == 2:
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 20)))
            elif len(data) > at + 8:
                data[at:at + 4] = b"\xff\xff\xff\x7f"  # huge lengths and sizes
            if not data:
                break
        cases.append(bytes(data))
    return cases


def make_dataset(root: Path, per_class: int, start: int = 0) -> Path:
    """root/<colour>/<n>.jpg for every colour: an easy three-class task."""
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(start, start + per_class):
            draw(root / name / f"{i:03d}.jpg", colour, seed=1000 * c + i)
    return root


def run(script: str, *args: str | Path, cwd: Path, check: bool = True, process: bool = False,
        ) -> subprocess.CompletedProcess:
    """Run one of the repo's scripts from another folder, as a user would, with no display.

    By default inside this interpreter, as `python script args` would run it (its own sys.argv, working
    folder and __main__; its exit code, stdout and stderr captured), which spares each call the seconds of
    importing torch; process=True starts a real Python process instead.
    """
    argv = [str(ROOT / script), *map(str, args)]
    with pytest.MonkeyPatch.context() as patch:
        for name in ("DISPLAY", "WAYLAND_DISPLAY", "MPLBACKEND"):
            patch.delenv(name, raising=False)
        if process:
            result = subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True)
        else:
            patch.setattr(sys, "argv", argv)
            patch.chdir(cwd)
            result = run_here(argv)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def run_here(argv: list[str]) -> subprocess.CompletedProcess:
    """runpy's `python argv...` in this process; an uncaught exception prints its traceback and exits 1, as
    Python itself does."""
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(stdout), redirect_stderr(stderr), warnings.catch_warnings():
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as exit_:
            if isinstance(exit_.code, str):
                print(exit_.code, file=sys.stderr)
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        except Exception:
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue())


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 2, one line on stderr naming the problem, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert [line for line in lines if ": error: " in line] == lines[-1:], result.stderr
    assert not any(line.startswith("usage:") for line in lines), result.stderr  # argparse's usage would bury it
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


# Small enough for seconds on a CPU, enough steps (60) for batch norm's running statistics to settle. --amp off:
# auto would time both precisions first, on a CPU without native bf16 for longer than these runs train; the tests
# that are about --amp auto add "--amp", "auto" (the last value given wins).
TRAIN_FLAGS = ("--epochs", "6", "--batch-size", "8", "--image-size", "64", "--lr", "0.05", "--warmup-epochs", "1",
               "--workers", "2", "--amp", "off")


@pytest.fixture(scope="session")
def split_data_dir(tmp_path_factory) -> Path:
    """A split of 3 colours x 40 drawn photos: data/train and data/val."""
    base = tmp_path_factory.mktemp("colours")
    make_dataset(base / "source", per_class=40)
    run("split_data.py", "--source", base / "source", "--out", base / "data", "--val-ratio", "0.25", cwd=base)
    return base / "data"


def copy_of_split(split_data_dir: Path, tmp_path: Path) -> Path:
    """tmp_path/data: a copy of the shared split (without its decode cache) for a test that changes it."""
    shutil.copytree(split_data_dir, tmp_path / "data", ignore=shutil.ignore_patterns(".cache"))
    return tmp_path / "data"


@pytest.fixture(scope="session")
def trained(split_data_dir, tmp_path_factory) -> dict[str, Path]:
    """One short training run on the colour task, in a real process as a user starts it; its outputs, shared
    by the tests that only read them."""
    out = tmp_path_factory.mktemp("trained")
    result = run("train.py", "--data-dir", split_data_dir, *TRAIN_FLAGS, "--amp", "auto", "--weights", out / "NiN.pth",
                 "--class-idx", out / "class_idx.json", "--out-dir", out / "run", cwd=out, process=True)
    return {"dir": out, "weights": out / "NiN.pth", "class_idx": out / "class_idx.json",
            "run": out / "run", "stdout": result.stdout}
