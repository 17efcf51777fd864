"""train.py: end to end on a drawn three-colour task, resume, the streaming path, and its errors."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import COLOURS, ROOT, TRAIN_FLAGS, assert_clean_error, copy_of_split, draw, make_dataset, run

import nin


def test_training_learns_and_writes_every_output(trained):
    rows = nin.load_csv(trained["run"] / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert set(rows[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "size", "seconds",
                            "mixed", "planned_epochs"}
    assert {r["planned_epochs"] for r in rows} == {"6"}  # no --time: the plan is --epochs throughout
    assert {r["size"] for r in rows} == {"64"}
    assert [r["mixed"] for r in rows] == ["1"] * 5 + ["0"]  # the default --unmixed-share: the last eighth, rounded
    epoch_lines = [line for line in trained["stdout"].splitlines() if line.startswith("epoch ")]
    assert ["unmixed" in line for line in epoch_lines] == [False] * 5 + [True]
    best = max(float(r["val_acc"]) for r in rows)
    assert best >= 0.9  # three classes: chance is 0.33
    saved = nin.load_weights(trained["weights"])
    classes = saved.classes
    assert classes == ["blue", "green", "red"] and saved.image_size == 64 and saved.model.num_classes == 3
    assert nin.load_class_names(trained["class_idx"]) == classes
    checkpoint = torch.load(trained["run"] / "checkpoint.pth", weights_only=True)
    assert checkpoint["epoch"] == 6 and checkpoint["best_acc"] == best and checkpoint["classes"] == classes
    assert checkpoint["args"]["amp"] == "auto"  # chosen again by each process start, which says what it took
    assert "--amp auto: " in trained["stdout"]
    assert {"model", "optimizer", "scheduler", "history", "args"} <= checkpoint.keys()
    best_epoch = next(r["epoch"] for r in rows if float(r["val_acc"]) == best)
    last = float(rows[-1]["val_acc"])
    assert f"val accuracy: last epoch {last:.4f}, best epoch {best:.4f} (epoch {best_epoch};" in trained["stdout"]
    assert f"NiN.pth holds the best epoch's (epoch {best_epoch}) weights" in trained["stdout"]
    lines = trained["stdout"].splitlines()
    assert any(line.startswith("accuracy ") and line.endswith(f"= {best:.4f}") for line in lines)
    for name in ("blue", "green", "red"):  # the per-class table of the best epoch
        assert any(line.split()[:1] == [name] and len(line.split()) == 5 for line in lines)
    for figure in ("curves.png", "confusion.png"):
        assert (trained["run"] / figure).read_bytes()[:4] == b"\x89PNG"
    cm = checkpoint["best_confusion"]
    assert (cm.diag().sum() / cm.sum()).item() == pytest.approx(best, abs=1e-4)


def same_weights(weights: Path, state: dict[str, torch.Tensor]) -> bool:
    """Whether NiN.pth (stored as float16) holds these weights."""
    saved = nin.load_weights(weights).model.state_dict()
    return all(torch.allclose(saved[k].float(), v.float(), rtol=1e-3, atol=1e-3) for k, v in state.items())


def test_keep_last_saves_the_last_epoch_weights(split_data_dir, tmp_path):
    run("train.py", "--data-dir", split_data_dir, *TRAIN_FLAGS, "--epochs", "3", "--keep", "last",
        "--weights", tmp_path / "NiN.pth", "--class-idx", tmp_path / "class_idx.json", "--out-dir", tmp_path / "run",
        cwd=tmp_path)
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert checkpoint["epoch"] == 3 and checkpoint["best_model"] is None  # --keep best would keep a copy
    assert same_weights(tmp_path / "NiN.pth", checkpoint["model"])
    first_epoch = {k: torch.zeros_like(v) for k, v in checkpoint["model"].items() if k.endswith("running_mean")}
    assert not same_weights(tmp_path / "NiN.pth", first_epoch)  # the comparison can fail


@pytest.mark.parametrize("module, function, code", [(os, "fsync", errno.ENOSPC), (tempfile, "mkstemp", errno.EROFS)],
                         ids=["full disk", "read-only folder"])
def test_a_write_the_system_refuses_is_one_line_and_the_files_before_stay_whole(split_data_dir, tmp_path,
                                                                                monkeypatch, module, function, code):
    """Every file the scripts write goes through a temporary file (mkstemp) flushed to disk (fsync): a full disk
    fails the flush, a read-only folder the temporary file (as root, chmod cannot make one; the system's error is
    raised where it would be)."""
    flags = [*TRAIN_FLAGS, "--epochs", "1", "--data-dir", split_data_dir, "--out-dir", tmp_path / "run",
             "--weights", tmp_path / "NiN.pth", "--class-idx", tmp_path / "class_idx.json"]
    run("train.py", *flags, cwd=tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def refused(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(module, function, refused)
    result = run("train.py", *flags, cwd=tmp_path, check=False)  # a new run over the old one's files
    assert_clean_error(result, os.strerror(code))
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # and no temporaries


def test_training_on_every_photo_without_val(tmp_path):
    make_dataset(tmp_path / "source", per_class=12)
    run("split_data.py", "--source", tmp_path / "source", "--out", tmp_path / "data", "--val-ratio", "0", cwd=tmp_path)
    assert not [f for f in (tmp_path / "data" / "val").rglob("*.jpg")]
    assert len(list((tmp_path / "data" / "train").rglob("*.jpg"))) == 36
    result = run("train.py", "--data-dir", tmp_path / "data", *TRAIN_FLAGS, "--epochs", "2",
                 "--weights", tmp_path / "NiN.pth", "--class-idx", tmp_path / "class_idx.json",
                 "--out-dir", tmp_path / "run", cwd=tmp_path)
    assert "36 training and 0 validation images" in result.stdout
    assert "nothing to validate on" in result.stdout
    assert "no validation photos: NiN.pth holds the last epoch's weights (epoch 2)" in result.stdout
    assert [r["val_acc"] for r in nin.load_csv(tmp_path / "run" / "metrics.csv")] == ["", ""]
    assert (tmp_path / "run" / "curves.png").is_file() and not (tmp_path / "run" / "confusion.png").exists()
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert same_weights(tmp_path / "NiN.pth", checkpoint["model"])
    photo = tmp_path / "source" / "red" / "000.jpg"
    predicted = run("predict.py", photo, "--weights", tmp_path / "NiN.pth", "--class-idx", tmp_path / "class_idx.json",
                    "--save", tmp_path / "p.png", cwd=tmp_path)
    assert predicted.stdout.startswith(f"{photo}: ")
    resumed = run("train.py", "--resume", "--out-dir", tmp_path / "run", "--epochs", "2", cwd=tmp_path)
    assert "after epoch 2\n" in resumed.stdout and "best val acc" not in resumed.stdout  # no val: no best to quote
    extended = run("train.py", "--resume", "--out-dir", tmp_path / "run", "--epochs", "3", cwd=tmp_path, check=False)
    assert_clean_error(extended, "--epochs 3 is not its 2")  # not silently ignored


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_interrupted_run_loses_nothing_and_resumes_at_the_right_epoch(split_data_dir, tmp_path, sig):
    """Stop a run of 6 epochs once its first epoch is saved: every output still loads, and --resume ends the
    run with each epoch exactly once. (An epoch here takes far longer than noticing the save and sending the
    signal, so the run is always cut midway.)"""
    out = tmp_path / "run"
    weights, class_idx = tmp_path / "NiN.pth", tmp_path / "class_idx.json"
    flags = [*TRAIN_FLAGS, "--amp", "auto", "--data-dir", split_data_dir, "--out-dir", out, "--weights", weights,
             "--class-idx", class_idx]
    # SIG_DFL first: a shell that starts jobs in the background makes them ignore Ctrl-C, and Python then
    # never turns it into KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, ROOT / "train.py", *map(str, flags)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while not (out / "metrics.csv").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    done = len(nin.load_csv(out / "metrics.csv"))
    saved = torch.load(out / "checkpoint.pth", weights_only=True)["epoch"]
    assert saved in (done, done + 1) and saved < 6  # the CSV is written last: a kill may fall just before it
    if sig == signal.SIGINT:  # a one-line message that says how to resume this run, no traceback
        assert proc.returncode == 2 and "Traceback" not in stderr
        assert f"epoch {saved} is saved" in stderr and f"python train.py --resume --out-dir {out}" in stderr
    nin.load_weights(weights)
    assert nin.load_class_names(class_idx) == ["blue", "green", "red"]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    resumed = run("train.py", "--resume", "--out-dir", out, "--amp", "off", cwd=tmp_path)  # given: it wins
    assert f"after epoch {saved}" in resumed.stdout and "--amp auto" not in resumed.stdout
    assert [int(r["epoch"]) for r in nin.load_csv(out / "metrics.csv")] == [1, 2, 3, 4, 5, 6]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 6
    weights.unlink()  # as if lost after the checkpoint was written: a finished run resumed puts it back
    again = run("train.py", "--resume", "--out-dir", out, cwd=tmp_path)  # no timed steps, no plan
    assert "finished its 6 epochs: nothing more to train" in again.stdout
    assert "should take" not in again.stdout and "--amp auto" not in again.stdout
    assert re.search(r"^took [^,]+$", again.stdout, re.MULTILINE)  # with no prediction to compare
    assert len(nin.load_csv(out / "metrics.csv")) == 6
    assert same_weights(weights, torch.load(out / "checkpoint.pth", weights_only=True)["best_model"])


def test_unreadable_training_photos_are_skipped_with_a_warning(tmp_path, split_data_dir):
    data = copy_of_split(split_data_dir, tmp_path)
    (data / "train" / "red" / "empty.jpg").write_bytes(b"")
    (data / "train" / "red" / "random.jpg").write_bytes(bytes(range(256)) * 4)
    good = next((data / "train" / "blue").iterdir()).read_bytes()
    (data / "train" / "blue" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    result = run("train.py", "--data-dir", data, *TRAIN_FLAGS, "--epochs", "1", "--out-dir", tmp_path / "run",
                 "--weights", tmp_path / "NiN.pth", "--class-idx", tmp_path / "c.json", cwd=tmp_path)
    for name in ("empty.jpg", "random.jpg", "truncated.jpg"):
        assert any(line.startswith("warning: skipped") and name in line for line in result.stderr.splitlines())
    assert (tmp_path / "NiN.pth").is_file()


def test_streaming_path_without_cache(split_data_dir, tmp_path):
    result = run("train.py", "--data-dir", split_data_dir, *TRAIN_FLAGS, "--epochs", "2", "--no-cache",
                 "--workers", "1", "--out-dir", tmp_path, "--weights", tmp_path / "NiN.pth",
                 "--class-idx", tmp_path / "c.json", cwd=tmp_path)
    assert len(nin.load_csv(tmp_path / "metrics.csv")) == 2
    assert (tmp_path / "NiN.pth").is_file() and "val accuracy: last epoch" in result.stdout


def test_decoded_images_are_cached_and_reused(trained, split_data_dir, tmp_path, monkeypatch):
    cached = sorted(p.name for p in (split_data_dir / ".cache").iterdir())
    assert any(name.startswith("train-64px-") for name in cached)
    assert any(name.startswith("val-64px-") for name in cached)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded the photos again instead of reading the cache")

    monkeypatch.setattr(nin, "decode_images", no_decoding)  # the next run on the same photos must not decode
    run("train.py", "--data-dir", split_data_dir, *TRAIN_FLAGS, "--epochs", "1", "--out-dir", tmp_path,
        "--weights", tmp_path / "NiN.pth", "--class-idx", tmp_path / "c.json", cwd=tmp_path)
    with pytest.raises(AssertionError, match="decoded the photos again"):  # a new size is decoded: the patch works
        run("train.py", "--data-dir", split_data_dir, *TRAIN_FLAGS, "--epochs", "1", "--image-size", "72",
            "--out-dir", tmp_path, "--weights", tmp_path / "NiN.pth", "--class-idx", tmp_path / "c.json", cwd=tmp_path)


def test_cache_is_rebuilt_when_the_photos_change(tmp_path, split_data_dir):
    data = copy_of_split(split_data_dir, tmp_path)
    flags = [*TRAIN_FLAGS, "--epochs", "1", "--data-dir", data, "--out-dir", tmp_path / "run",
             "--weights", tmp_path / "NiN.pth", "--class-idx", tmp_path / "c.json"]
    run("train.py", *flags, cwd=tmp_path)
    first = sorted((data / ".cache").iterdir())
    draw(data / "train" / "red" / "new.jpg", (220, 40, 40), seed=99)
    run("train.py", *flags, cwd=tmp_path)
    second = sorted((data / ".cache").iterdir())
    assert len(second) == 2 and first != second  # a new train cache replaced the stale one
    assert [p for p in first if "val-" in p.name] == [p for p in second if "val-" in p.name]


def test_augmentation_is_batched_crop_and_flip():
    import train

    torch.manual_seed(0)
    flat = torch.arange(16, dtype=torch.uint8).mul(15).view(16, 1, 1, 1).expand(16, 3, 40, 40)
    out = train.random_resized_crop_flip(flat, 24, min_scale=0.25)
    assert out.shape == (16, 3, 24, 24)  # each crop comes from its own image, none from a neighbour
    torch.testing.assert_close(out, flat[:, :, :24, :24].float())

    ramp = torch.linspace(0, 255, 40).to(torch.uint8).view(1, 1, 1, 40).expand(200, 3, 40, 40)
    out = train.random_resized_crop_flip(ramp, 24, min_scale=0.25)
    rising = (out[:, 0, 0, -1] > out[:, 0, 0, 0]).float().mean()
    assert 0.35 < rising < 0.65  # about half are mirrored
    zoom = (out[:, 0, 0, -1] - out[:, 0, 0, 0]).abs()
    assert zoom.min() < 0.6 * zoom.max()  # crops of different sizes


def test_mixup_and_cutmix_give_soft_targets_for_the_same_images():
    import train

    torch.manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8)
    labels = torch.arange(8) % 4
    x, targets = train.augment(images, labels, 32, 0.5, train.make_mixer(0.2, 1.0, num_classes=4))
    assert x.shape == (8, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    assert targets.shape == (8, 4)
    own, neighbour = targets[torch.arange(8), labels], targets[torch.arange(8), labels.roll(1)]
    torch.testing.assert_close(own + neighbour, torch.ones(8))  # each image mixed with the previous one...
    torch.testing.assert_close(own, own[:1].expand(8))  # ...in one proportion for the whole batch
    assert train.make_mixer(0, 0, 4) is None


def test_ema_forgets_the_random_start_within_a_few_dozen_steps():
    """The ramp is why: a plain 0.999 would still be 95 % the random start after 50 steps."""
    import train

    model = torch.nn.Linear(4, 2)
    ema = train.make_ema(model, decay=0.999)
    with torch.no_grad():
        start = model.weight.clone()
        model.weight.add_(1.0)  # where training went
    for _ in range(50):
        ema.update_parameters(model)
    share_of_start = ((model.weight - ema.module.weight) / (model.weight - start)).mean().item()
    assert 0 <= share_of_start < 0.05


def test_mixing_and_ema_run_saves_the_averaged_weights(split_data_dir, tmp_path):
    out = tmp_path / "run"
    run("train.py", *TRAIN_FLAGS, "--epochs", "1", "--mixup", "0.2", "--cutmix", "1.0", "--ema", "0.99",
        "--data-dir", split_data_dir, "--out-dir", out, "--weights", tmp_path / "NiN.pth",
        "--class-idx", tmp_path / "c.json", cwd=tmp_path)
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert checkpoint["ema"]["n_averaged"].item() == len(list((split_data_dir / "train").rglob("*.jpg"))) // 8
    model = nin.load_weights(tmp_path / "NiN.pth").model  # the only epoch, so the best one
    averaged = {k.removeprefix("module."): v for k, v in checkpoint["ema"].items() if k != "n_averaged"}
    key = "features.0.0.weight"
    for name, value in model.state_dict().items():  # NiN.pth holds the moving average...
        torch.testing.assert_close(value, averaged[name].to(value.dtype), rtol=1e-3, atol=1e-4)
    assert not torch.allclose(model.state_dict()[key], checkpoint["model"][key], atol=1e-4)  # ...not the raw weights


def test_progressive_resizing_trains_equal_stages_growing_to_the_image_size():
    import train

    sizes = [train.training_size(epoch, 120, 112, 160) for epoch in range(1, 121)]
    assert [sizes.count(s) for s in (112, 128, 144, 160)] == [30, 30, 30, 30] and sizes == sorted(sizes)
    assert {train.training_size(epoch, 44, 80, 112) for epoch in (1, 15, 16, 30, 31, 44)} == {80, 96, 112}
    assert [train.training_size(epoch, 4, 64, 100) for epoch in range(1, 5)] == [64, 80, 96, 100]  # ends at the size
    assert [train.training_size(epoch, 3, 112, 160) for epoch in (1, 2, 3)] == [128, 144, 160]  # short runs too
    for off in (0, 160, 200):  # no start size, or none below the image size: every epoch at the image size
        assert {train.training_size(epoch, 10, off, 160) for epoch in range(1, 11)} == {160}


def test_progressive_run_validates_and_saves_at_the_full_size(split_data_dir, tmp_path):
    flags = [*TRAIN_FLAGS, "--epochs", "3", "--image-size", "80", "--start-size", "64", "--data-dir", split_data_dir,
             "--out-dir", tmp_path / "run", "--weights", tmp_path / "NiN.pth", "--class-idx", tmp_path / "c.json"]
    result = run("train.py", *flags, cwd=tmp_path)
    epochs = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split()[-3] for line in epochs] == ["64", "64", "80"]  # "... 64 px  1.2s"
    assert [r["size"] for r in nin.load_csv(tmp_path / "run" / "metrics.csv")] == ["64", "64", "80"]
    assert nin.load_weights(tmp_path / "NiN.pth").image_size == 80  # predict.py's input size: the final one


def test_resume_of_a_checkpoint_from_before_newer_flags(split_data_dir, tmp_path):
    out = tmp_path / "run"
    flags = [*TRAIN_FLAGS, "--epochs", "1", "--head-width", "0", "--mixup", "0", "--cutmix", "0",
             "--data-dir", split_data_dir, "--out-dir", out, "--weights", tmp_path / "NiN.pth",
             "--class-idx", tmp_path / "c.json"]
    run("train.py", *flags, cwd=tmp_path)
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    for newer in ("head_width", "mixup", "cutmix", "ema", "start_size", "unmixed_share"):  # as an older train.py wrote
        del checkpoint["args"][newer]
    for newer in ("size", "mixed", "planned_epochs"):  # columns that metrics.csv did not have then
        del checkpoint["history"][0][newer]
    checkpoint["args"]["epochs"] = 2
    torch.save(checkpoint, out / "checkpoint.pth")
    result = run("train.py", "--resume", "--out-dir", out, cwd=tmp_path)
    assert "resumed" in result.stdout
    rows = nin.load_csv(out / "metrics.csv")
    assert [(r["epoch"], r["size"], r["mixed"]) for r in rows] == [("1", "64", "0"), ("2", "64", "0")]  # no mixing
    assert [r["planned_epochs"] for r in rows] == ["", "2"]  # the old epoch's plan unknown, not guessed


@pytest.mark.parametrize("problem", ["missing", "val missing", "empty", "a file"])
def test_missing_or_unusable_data_folders(tmp_path, split_data_dir, problem):
    data = tmp_path / "data"
    if problem == "val missing":  # a whole train/, but no val/ beside it
        shutil.copytree(split_data_dir / "train", data / "train")
    elif problem == "empty":
        (data / "train").mkdir(parents=True)
        (data / "val").mkdir()
    elif problem == "a file":  # e.g. an unreadable or mistaken path: not a folder of class folders
        data.mkdir()
        (data / "train").write_text("not a folder")
        (data / "val").mkdir()
    result = run("train.py", "--data-dir", data, cwd=tmp_path, check=False)
    named = {"val missing": f"{data / 'val'} not found", "empty": "class folder"}.get(problem, "split_data.py")
    assert_clean_error(result, named)


def test_empty_class_folder_is_a_clear_error(tmp_path, split_data_dir):
    data = copy_of_split(split_data_dir, tmp_path)
    (data / "train" / "purple").mkdir()
    (data / "val" / "purple").mkdir()
    result = run("train.py", "--data-dir", data, *TRAIN_FLAGS, cwd=tmp_path, check=False)
    assert_clean_error(result, "purple")


def test_a_class_without_val_photos_trains_with_a_warning(tmp_path, split_data_dir):
    data = copy_of_split(split_data_dir, tmp_path)  # as split_data.py may leave a class of a few photos
    for name in ("green", "red"):
        for photo in (data / "val" / name).iterdir():
            photo.rename(data / "train" / name / photo.name)
    (data / "val" / "green" / "broken.jpg").write_text("not a photo")  # green's only val file cannot be read
    result = run("train.py", "--data-dir", data, *TRAIN_FLAGS, "--epochs", "1", "--out-dir", tmp_path / "run",
                 "--weights", tmp_path / "NiN.pth", "--class-idx", tmp_path / "c.json", cwd=tmp_path)
    assert f"warning: {data / 'val'} has no photos of green, red: validation cannot tell" in result.stderr
    assert nin.load_class_names(tmp_path / "c.json") == ["blue", "green", "red"]
    listed = len(list((data / "val").glob("*/*.jpg")))  # blue's and the unreadable one
    assert f"and {listed} validation images" in result.stdout
    for name in ("green", "red"):  # no recall to give, not 0
        assert re.search(rf"^{name} +\d\.\d{{3}} +- +- +0$", result.stdout, re.MULTILINE)


def test_the_best_epoch_kept_is_the_one_metrics_csv_names():
    import train

    progress = train.Progress()
    first, second = torch.tensor([[91241, 8759], [0, 0]]), torch.tensor([[91243, 8757], [0, 0]])  # 91.241, 91.243 %
    assert progress.record(1, 1.0, 0.5, 0.3, first, 0.1, 64, 1.0, mixed=True, planned=3)
    assert not progress.record(2, 1.0, 0.5, 0.3, second, 0.1, 64, 1.0, mixed=True, planned=3)  # both 0.9124 in the CSV
    assert train.best_validated(progress.history)["epoch"] == 1 and progress.best_cm is first


def test_hidden_folders_are_not_classes(split_data_dir, tmp_path):
    """A Jupyter checkpoint folder (or any hidden one) in train/ and val/ is not a class, none inside a class
    folder holds photos, macOS's `._photo.jpg` metadata files are not photos, and files not named like images
    are left out."""
    import train

    data = copy_of_split(split_data_dir, tmp_path)
    for side in ("train", "val"):
        draw(data / side / ".ipynb_checkpoints" / "copy-checkpoint.jpg", (220, 40, 40), seed=7)
        draw(data / side / "red" / ".ipynb_checkpoints" / "copy-checkpoint.jpg", (220, 40, 40), seed=8)
        (data / side / "red" / "._metadata.jpg").write_bytes(b"\x00\x05\x16\x07 macOS AppleDouble, not a JPEG")
        (data / side / "red" / "notes.txt").write_text("taken in May")
    photos = train.find_images(data / "train"), train.find_val_images(data / "val")
    assert [p.classes for p in photos] == [list(COLOURS)] * 2
    assert [len(p) for p in photos] == [len(train.find_images(split_data_dir / side)) for side in ("train", "val")]


def test_class_folders_that_are_links_are_read(split_data_dir, tmp_path):
    """A val/ made of links to class folders kept elsewhere is validated on, not "nothing to validate on"."""
    import train

    val = tmp_path / "val"
    val.mkdir()
    for class_folder in (split_data_dir / "val").iterdir():
        if class_folder.is_dir():
            (val / class_folder.name).symlink_to(class_folder.resolve(), target_is_directory=True)
    photos = train.find_val_images(val)
    assert photos is not None and len(photos) == len(train.find_images(split_data_dir / "val")) > 0


def test_train_and_val_with_different_classes(tmp_path, split_data_dir):
    data = copy_of_split(split_data_dir, tmp_path)
    shutil.rmtree(data / "val" / "green")
    result = run("train.py", "--data-dir", data, *TRAIN_FLAGS, cwd=tmp_path, check=False)
    assert_clean_error(result, "different classes")


def test_half_swapped_split_is_refused(tmp_path, split_data_dir):
    data = copy_of_split(split_data_dir, tmp_path)
    (data / "val" / ".split_id").write_text("another run\n")
    result = run("train.py", "--data-dir", data, *TRAIN_FLAGS, cwd=tmp_path, check=False)
    assert_clean_error(result, "split_data.py")


@pytest.mark.parametrize("flag,value", [("--epochs", "-1"), ("--batch-size", "0"), ("--image-size", "32"),
                                        ("--lr", "0"), ("--min-crop-scale", "1.5"), ("--head-width", "-1"),
                                        ("--mixup", "-0.2"), ("--ema", "1"), ("--start-size", "32"),
                                        ("--device", "cuda:99"), ("--lr", "inf"), ("--lr", "nan"),
                                        ("--momentum", "-1"), ("--momentum", "1"), ("--warmup-epochs", "inf"),
                                        ("--seed", str(2**70)), ("--head-width", "1000000"),
                                        ("--image-size", "100000"), ("--weight-decay", "nan"), ("--cutmix", "inf"),
                                        ("--label-smoothing", "1"), ("--unmixed-share", "1")])
def test_nonsense_flags_are_refused(tmp_path, flag, value):
    assert_clean_error(run("train.py", flag, value, cwd=tmp_path, check=False), flag)


def test_help_documents_every_flag(tmp_path):
    """Every flag of the parser has a help text, and --help shows it beside the flag with its default."""
    import train

    text = run("train.py", "--help", cwd=tmp_path).stdout
    assert "\n\nUnder torchrun" in text  # the description keeps its paragraphs
    out = " ".join(text.split())  # argparse wraps lines anywhere
    assert "(default: 120)" in out and "(default: None)" not in out and "(default: False)" not in out
    flags = [action for action in train.arg_parser()._actions if action.option_strings != ["-h", "--help"]]
    assert len(flags) >= 30
    for action in flags:
        assert action.help, action.option_strings
        assert f"{action.option_strings[0]} " in out and " ".join(action.help.split()[:4]) in out


def test_adam_and_adamw_with_the_step_schedule(split_data_dir, tmp_path):
    """The classic recipe's step schedule (x0.1 every --step-epochs) with Adam, in a real run; AdamW is Adam
    with decoupled weight decay."""
    import train

    run("train.py", *TRAIN_FLAGS, "--epochs", "3", "--optimizer", "adam", "--lr", "0.002", "--schedule", "step",
        "--step-epochs", "1", "--data-dir", split_data_dir, "--out-dir", tmp_path / "run",
        "--weights", tmp_path / "NiN.pth", "--class-idx", tmp_path / "c.json", cwd=tmp_path)
    rows = nin.load_csv(tmp_path / "run" / "metrics.csv")
    assert [float(r["lr"]) for r in rows] == pytest.approx([2e-3, 2e-4, 2e-5])
    assert all(float(r["train_loss"]) < 10 for r in rows)  # finite and sane
    state = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)["optimizer"]["state"]
    assert "exp_avg_sq" in next(iter(state.values()))  # Adam's second moments, not SGD's momentum buffer
    model = torch.nn.Linear(3, 2)
    for name, kind in (("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
        optimizer = train.make_optimizer(model, name, lr=0.1, momentum=0.9, weight_decay=1e-3)
        assert type(optimizer) is kind
        assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-3, 0.0]  # none on the bias


def test_torchrun_refuses_mps_instead_of_training_on_the_cpu(monkeypatch):
    import train
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(nin, "pick_device", lambda name: torch.device("mps"))  # as on a Mac
    with pytest.raises(nin.CLIError, match="pass --device cpu"):
        train.start_run(None)
    assert not torch.distributed.is_initialized()


def test_flags_the_device_cannot_honour_are_clear_errors_not_a_crash_mid_run(tmp_path, monkeypatch):
    """torch's SyncBatchNorm needs CUDA: under torchrun on the CPU it would fail with a traceback in the first
    step. main() checks these right after choosing the device."""
    import train
    args = train.parse_args(["--sync-bn", "--device", "cpu"])
    two_processes = dataclasses.replace(train.start_run("cpu"), world=2)
    with pytest.raises(nin.CLIError, match="--sync-bn is for torchrun on CUDA"):
        train.check_device_flags(args, two_processes)
    train.check_device_flags(args, train.start_run("cpu"))  # one process: the flag has nothing to synchronise
    with pytest.raises(nin.CLIError, match="--amp fp16 is for GPUs"):
        train.check_device_flags(train.parse_args(["--amp", "fp16"]), cpu_run())
    mac = dataclasses.replace(cpu_run(), device=torch.device("mps"))
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: major < 14)  # a Mac on 13
    with pytest.raises(nin.CLIError, match="--amp bf16 on Apple's MPS needs macOS 14"):
        train.check_device_flags(train.parse_args(["--amp", "bf16"]), mac)
    # main() checks them before reading any photo: the missing data folder is never reached.
    refused = run("train.py", "--amp", "fp16", "--device", "cpu", "--data-dir", tmp_path / "missing", cwd=tmp_path,
                  check=False)
    assert_clean_error(refused, "--amp fp16 is for GPUs")


LEAVES_GROUP_AT_EXIT = """
import atexit, weakref
import torch, torch.distributed as dist
import train
train.start_run("cpu")  # as one process of torchrun, from the environment
ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
ddp(torch.ones(1, 2)).sum().backward()
wrapper = weakref.ref(ddp)
cycle = [ddp]
cycle.append(cycle)  # in a run, the wrapper is reachable only through reference cycles by now
del ddp, cycle
atexit._run_exitfuncs()  # what Python runs first when it shuts down
print("initialized" if dist.is_initialized() else "left", "alive" if wrapper() is not None else "freed")
"""


def test_torchrun_process_group_is_left_and_freed_before_python_shuts_down():
    """A gloo thread still running when the interpreter shuts down aborts a process whose run went well
    (SIGABRT, "terminate called without an active exception"), now and then: at exit, the group is left and
    the DistributedDataParallel wrapper that holds it freed while Python is whole."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    result = subprocess.run([sys.executable, "-c", LEAVES_GROUP_AT_EXIT], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["left", "freed"]


def torchrun_two_processes(*flags, cwd: Path, script: Path = ROOT / "train.py", timeout: int = 600,
                           ) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             script, *map(str, flags)], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result


def test_two_process_torchrun_on_the_cpu(split_data_dir, tmp_path):
    """DDP over gloo, planned by --time: one set of outputs, written by the first process, that plain predict.py
    can use; then --resume. Each process keeps its own clock, and every re-plan takes the tightest of them: here
    the second process's clock runs 10 s ahead, so only its view of the budget ends the run in time (a process
    that planned on its own clock would train epochs the other never joins, and wait for it in a collective
    until DIST_TIMEOUT_MINUTES)."""
    ahead = tmp_path / "clock_ahead.py"
    ahead.write_text(f"""import os, sys
sys.path.insert(0, {str(ROOT)!r})
import nin, train
if os.environ["RANK"] == "1":
    spent = train.Clock.spent
    train.Clock.spent = lambda self: spent(self) + 10
nin.run_cli(train.main)
""")
    out = tmp_path / "run"
    flags = ["--time", "30s", "--batch-size", "8", "--per-process-batch", "--image-size", "80", "--start-size", "64",
             "--amp", "off", "--device", "cpu", "--workers", "1", "--data-dir", split_data_dir, "--out-dir", out,
             "--weights", tmp_path / "NiN.pth", "--class-idx", tmp_path / "class_idx.json"]
    result = torchrun_two_processes(*flags, cwd=tmp_path, script=ahead, timeout=240)
    assert result.stdout.count("val accuracy: last epoch") == 1  # only the first process speaks
    assert "2 processes x batch 8 = 16 images a step" in result.stdout
    assert result.stdout.count("--time 30 s: ") == 1, result.stdout  # one plan, the first process's
    assert "to end within --time 30 s" in result.stdout  # re-planned shorter for the second process's clock
    rows = nin.load_csv(out / "metrics.csv")
    assert rows[-1]["size"] == "80"  # the plan's own last epoch, not one cut short by "stopping after"
    assert max(float(r["val_acc"]) for r in rows if r["val_acc"]) >= 0.9
    # By the first process's clock, 10 s behind: the second one's limit, and seconds for the last save, which only
    # the first process's plans keep time for (it alone saves); its own view of the budget would run to 30 s.
    took = re.search(r"took (\d+) s", result.stdout)
    assert took and int(took.group(1)) <= 30 - 10 + 3, result.stdout
    probe = draw(tmp_path / "probe.png", (220, 40, 40), seed=4242)
    predicted = run("predict.py", probe, "--weights", tmp_path / "NiN.pth", "--class-idx",
                    tmp_path / "class_idx.json", "--json", cwd=tmp_path)
    assert '"class": "red"' in predicted.stdout

    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)  # as if the run had been meant to be one
    done = checkpoint["epoch"]  # epoch longer, without --time (resuming a --time run is tested below)
    checkpoint["args"]["epochs"], checkpoint["args"]["time"] = done + 1, None
    torch.save(checkpoint, out / "checkpoint.pth")
    resumed = torchrun_two_processes("--resume", "--out-dir", out, "--device", "cpu", cwd=tmp_path)
    assert resumed.stdout.count("resumed") == 1 and f"after epoch {done}" in resumed.stdout
    assert [int(r["epoch"]) for r in nin.load_csv(out / "metrics.csv")] == list(range(1, done + 2))


@pytest.mark.parametrize("text,seconds,echoed", [("90s", 90, "1 min 30 s"), ("30m", 1800, "30 min"),
                                                 ("1h30m", 5400, "1 h 30 min"), ("2h", 7200, "2 h 00 min"),
                                                 ("1m5s", 65, "65 s"), ("10m30s", 630, "10 min 30 s")])
def test_durations(text, seconds, echoed):
    import train

    assert train.parse_duration(text) == seconds
    assert train.format_duration(seconds) == echoed  # under an hour, not rounded to minutes


@pytest.mark.parametrize("seconds,shown", [(80.4, "80 s"), (89.6, "1 min 30 s"), (1543.7, "25 min 44 s"),
                                           (3599.6, "1 h 00 min"), (11_430, "3 h 10 min")])
def test_measured_durations_read_in_the_largest_units(seconds, shown):
    import train

    assert train.format_duration(seconds) == shown


@pytest.mark.parametrize("seconds,shown", [(75.4, "about 75 s"), (599.4, "about 9 min 59 s"),
                                           (1543.7, "about 26 min"), (11_430, "about 3 h 10 min")])
def test_predictions_read_no_finer_than_a_minute_from_ten_minutes(seconds, shown):
    import train

    assert train.format_estimate(seconds) == shown


@pytest.mark.parametrize("text", ["", "30", "30 min", "1.5h", "m", "0s", "-5m", "5m1h"])
def test_bad_durations_are_one_line_errors(tmp_path, text):
    assert_clean_error(run("train.py", "--time", text, cwd=tmp_path, check=False), "--time")


@pytest.mark.parametrize("flags,named", [(["--epochs", "5"], "not both"), (["--epoch", "5"], "--epoch"),
                                         (["--no-cache"], "not with --no-cache"),
                                         (["--schedule", "step"], "not with --schedule step")])
def test_time_with_flags_it_cannot_plan_around_is_refused(tmp_path, flags, named):
    assert_clean_error(run("train.py", "--time", "30m", *flags, cwd=tmp_path, check=False), named)


def test_faithful_refuses_a_dropout_it_would_ignore(tmp_path):
    assert_clean_error(run("train.py", "--faithful", "--dropout", "0.2", cwd=tmp_path, check=False), "--faithful")


def test_curves_of_a_run_whose_last_epoch_was_not_validated(tmp_path):
    import train

    progress = train.Progress()
    for epoch, cm in ((1, torch.tensor([[3, 1], [0, 4]])), (2, None)):  # epoch 2 skipped validation
        progress.record(epoch, 1.0, 0.5, None if cm is None else 0.7, cm, 0.05, 64, 1.0, mixed=True, planned=3)
    train.save_curves(progress, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def synthetic_pace(step: float, val: float):
    import train

    return train.Pace({size: step * size / 160 for size in range(64, 161, 16)}, val)


def simulated_plan(monkeypatch) -> tuple:
    """The start of a simulated --time 100s run of the default recipe: the pace (0.1 s a 160-px step, 0.1 s to
    validate), the plan fitted to it, 10 steps an epoch and the budget. No real time passes: the clock counts
    only what the test adds to it."""
    import train

    monkeypatch.setattr(train.Clock, "spent", lambda self: self.spent_before)
    pace, steps, budget = synthetic_pace(step=0.1, val=0.1), 10, 100.0  # 0.7 s a 112-px epoch, 1 s a 160-px one
    recipe = train.parse_args(["--time", "100s", "--image-size", "160", "--start-size", "112"])
    args = train.fit_epochs(recipe, pace, steps, available=train.PLAN_SHARE * budget, budget=budget)
    return pace, args, steps, budget


def test_a_long_prediction_points_to_time_except_beside_no_cache(monkeypatch, capsys):
    """--time cannot plan a --no-cache run, and that run's timed steps do not see its decoding: it says so."""
    import train

    monkeypatch.setattr(train.Clock, "spent", lambda self: self.spent_before)  # no real time passes
    for flags, told in (([], "; `--time 30m` trains the best model"), (["--no-cache"], ", plus the decoding")):
        train.Clock().predict(synthetic_pace(step=1.0, val=1.0), train.parse_args(flags), 100, 0, cpu_run())
        line = capsys.readouterr().out
        assert told in line and ("--time" in line) == (not flags)


def test_the_summary_says_when_the_run_was_re_planned_after_its_prediction(monkeypatch, capsys):
    import train

    monkeypatch.setattr(train.Clock, "spent", lambda self: self.spent_before)  # no real time passes
    args, clock = train.parse_args(["--time", "60s"]), train.Clock()
    args.epochs = 7  # as planned
    clock.predict(synthetic_pace(step=0.1, val=1.0), args, 10, 0, cpu_run())
    assert "should take about" in capsys.readouterr().out
    clock.spent_before = 2 * clock.predicted
    assert clock.report(args).endswith("(+100 %); --time 60 s") and "re-planning" not in clock.report(args)
    args.epochs = 5  # a slower machine: the plan shrank after the prediction
    assert "for the 7 epochs planned then, 5 after re-planning (+100 %)" in clock.report(args)


def test_a_plan_fills_its_budget_and_validates_less_when_validation_is_dear():
    import train

    args = train.parse_args(["--image-size", "160", "--start-size", "112"])
    pace, steps, available = synthetic_pace(step=0.5, val=4.0), 20, 1000.0
    plan = train.fit_epochs(args, pace, steps, available, budget=1000 / train.PLAN_SHARE)
    assert pace.seconds(plan, steps) <= available  # it fits...
    longer = argparse.Namespace(**{**vars(plan), "epochs": plan.epochs + 1})
    assert pace.seconds(longer, steps) > available  # ...and one more epoch would not
    assert 50 < plan.epochs < 120 and plan.val_every > 1  # 4 s a validation is too dear to do after every epoch
    validated = [e for e in range(1, plan.epochs + 1) if train.validates(e, plan.epochs, plan.val_every)]
    assert len(validated) * pace.val <= train.VAL_SHARE * 1000 / train.PLAN_SHARE + train.VAL_LAST_EPOCHS * pace.val
    assert validated[-3:] == [plan.epochs - 2, plan.epochs - 1, plan.epochs]  # the last epochs always
    assert train.fit_epochs(args, pace, steps, available=5.0, budget=5.0) is None  # not even one epoch


def train_pace(step: dict[int, float]):
    """Seconds per training step at each size, and 0.1 s to validate."""
    import train

    return train.Pace(step, val=0.1)


def short_sizes_cheap_pace():
    """Small images cost little and large ones much (as on a CPU): 120 epochs of the short recipe fit in 10
    minutes with time to spare, and fewer than MIN_DEFAULT_EPOCHS of the default recipe."""
    return train_pace({80: 0.5, 96: 0.5, 112: 1.0, 128: 20.0, 144: 20.0, 160: 20.0})


def planned(monkeypatch, data_dir: Path, argv: list[str], clock=None):
    """plan_for_budget as train.py calls it for this command line, on the photos in data_dir, with their decoding
    estimated at 1 s (the tests set measure_pace themselves): the settings and the pace it plans with."""
    import train

    monkeypatch.setattr(train, "estimate_decoding", lambda *rest: 1.0)
    photos = (train.find_images(data_dir / "train"), train.find_val_images(data_dir / "val"))
    return train.plan_for_budget(train.parse_args(argv), train.explicit_flags(argv), photos, clock or train.Clock(),
                                 cpu_run())


@pytest.mark.parametrize("pace,recipe", [(lambda: synthetic_pace(0.01, val=0.1), "default"),
                                         (lambda: synthetic_pace(20.0, val=0.1), "short"),
                                         (short_sizes_cheap_pace, "default, fewer epochs"),
                                         (lambda: synthetic_pace(6.0, val=0.1), "default, a slow machine"),
                                         (lambda: train_pace({80: 0.5, 96: 0.5, 112: 1.0, 128: 1e4, 144: 1e4,
                                                              160: 1e4}), "short, whole")])
def test_a_budget_chooses_the_recipe_and_explicit_flags_win(monkeypatch, split_data_dir, capsys, pace, recipe):
    import train

    monkeypatch.setattr(train, "measure_pace", lambda args, *rest: pace())
    args, _ = planned(monkeypatch, split_data_dir, ["--time", "10m", "--weight-decay", "2e-3"])
    assert args.weight_decay == 2e-3  # given on the command line: kept
    if recipe == "default":  # 120 epochs of 2 steps at 0.01 s fit in 10 minutes
        assert (args.epochs, args.image_size, args.mixup, args.batch_size) == (train.EPOCHS, nin.IMAGE_SIZE,
                                                                               train.MIXUP, train.CPU_BATCH_SIZE)
    elif recipe == "short, whole":  # not one epoch of the default recipe fits, and the short one's whole run does
        assert args.image_size == train.SHORT_RECIPE["image_size"] and args.epochs == train.EPOCHS
    elif recipe == "short":  # 20 s a step: too few epochs of either recipe, so the short one, with what fits of it
        assert all(getattr(args, name) == value for name, value in train.SHORT_RECIPE.items() if name != "weight_decay")
        assert args.epochs < train.EPOCHS
        default_epochs = re.search(r"at most (\d+) epochs of the default recipe fit", capsys.readouterr().out)
        assert default_epochs and 0 < int(default_epochs.group(1)) < train.MIN_DEFAULT_EPOCHS  # it says why
    else:  # the default recipe, with what fits of it
        assert (args.image_size, args.mixup, args.batch_size) == (nin.IMAGE_SIZE, train.MIXUP, train.CPU_BATCH_SIZE)
        if recipe == "default, fewer epochs":  # ... as the short recipe's whole run would leave time unused
            assert 0 < args.epochs < train.MIN_DEFAULT_EPOCHS
        else:  # 6 s a step: about half of the short recipe's epochs fit, and more than MIN_DEFAULT_EPOCHS of these
            assert train.MIN_DEFAULT_EPOCHS <= args.epochs < train.EPOCHS


def test_on_a_cpu_a_plan_takes_a_batch_of_32_unless_the_batch_is_given(monkeypatch, split_data_dir):
    import train

    monkeypatch.setattr(train, "measure_pace", lambda args, *rest: synthetic_pace(0.01, val=0.1))
    for argv, batch in ((["--time", "10m"], train.CPU_BATCH_SIZE), (["--time", "10m", "--batch-size", "64"], 64)):
        args, _ = planned(monkeypatch, split_data_dir, argv)
        assert (args.epochs, args.image_size, args.batch_size) == (train.EPOCHS, nin.IMAGE_SIZE, batch)


@pytest.mark.parametrize("pace,default_sizes", [(lambda: synthetic_pace(20.0, val=0.1), [[112]]),
                                                (lambda: synthetic_pace(6.0, val=0.1), [[112], [112, 128, 144, 160]]),
                                                (short_sizes_cheap_pace, [[112, 128, 144, 160]])])
def test_the_default_recipe_is_timed_whole_only_where_it_may_get_the_budget(monkeypatch, split_data_dir, pace,
                                                                           default_sizes):
    """On a slow CPU, timing the default recipe's large images takes a good part of a short budget, to learn only
    that the recipe does not get it: a few steps at its smallest size first, and the other sizes only where at
    least MIN_DEFAULT_EPOCHS epochs of those would fit (or where the short recipe's whole run fits, and the
    default one gets the budget whatever fits of it)."""
    import train

    measured = []  # the sizes of each measurement, in order

    def measure_pace(args, *rest):
        measured.append(train.stage_sizes(args.start_size, args.image_size))
        return pace()

    monkeypatch.setattr(train, "measure_pace", measure_pace)
    planned(monkeypatch, split_data_dir, ["--time", "10m"])
    assert measured == [[80, 96, 112], *default_sizes]  # the short recipe first, then what the default one needs


def test_a_plan_fits_the_time_left_once_every_recipe_is_timed(monkeypatch, split_data_dir):
    """The short recipe is timed first, and timing the default one after it takes time too (a minute each here,
    as a slow CPU might): the plan fits what is left after both."""
    import train

    monkeypatch.setattr(train.Clock, "spent", lambda self: self.spent_before)  # time passes only while timing
    clock = train.Clock()

    def measure_pace(args, *rest):
        clock.spent_before += 60.0
        return synthetic_pace(20.0, val=0.1)

    monkeypatch.setattr(train, "measure_pace", measure_pace)
    args, pace = planned(monkeypatch, split_data_dir, ["--time", "10m"], clock)
    assert clock.spent() == 120.0 and args.batch_size == train.SHORT_RECIPE["batch_size"]  # short, then a probe
    steps = train.steps_per_epoch(len(train.find_images(split_data_dir / "train")), args.batch_size, 1)
    assert pace.seconds(args, steps) <= train.PLAN_SHARE * 600 - clock.spent() - 1.0


def test_flags_that_set_both_recipes_plan_one_candidate(monkeypatch, split_data_dir, capsys):
    """Flags that set everything the short recipe changes leave nothing to choose: one measurement, and the plan
    names the flags' recipe instead of calling it the short one, even where few of its epochs fit."""
    import train

    measured = []
    monkeypatch.setattr(train, "measure_pace", lambda args, *rest: measured.append(args) or synthetic_pace(20.0, 0.1))
    argv = ["--time", "10m", "--image-size", "160", "--start-size", "112", "--batch-size", "64", "--mixup", "0.2",
            "--cutmix", "1", "--label-smoothing", "0", "--weight-decay", "5e-4"]
    args, _ = planned(monkeypatch, split_data_dir, argv)
    assert len(measured) == 1
    assert (args.image_size, args.batch_size, args.mixup) == (160, 64, 0.2)
    assert 0 < args.epochs < train.MIN_DEFAULT_EPOCHS  # so the old rule would have taken the "short" candidate
    out = capsys.readouterr().out
    assert "your flags' recipe" in out and "short recipe" not in out
    # the error says where the time went: a budget spent before training starts
    with pytest.raises(nin.CLIError, match="too short here: starting and timing this machine took"):
        planned(monkeypatch, split_data_dir, ["--time", "5s"])


@pytest.mark.parametrize("epochs,every,said", [(40, 1, "every epoch"), (40, 6, "every 6 epochs and the last 3"),
                                              (3, 6, "every epoch"), (8, 6, "the last 3 epochs"),
                                              (9, 6, "every 6 epochs and the last 3")])
def test_a_plan_says_which_epochs_it_validates(epochs, every, said):
    import train

    validated = [epoch for epoch in range(1, epochs + 1) if train.validates(epoch, epochs, every)]
    assert train.validation_schedule(epochs, every) == said
    assert (said == "every epoch") == (len(validated) == epochs)
    assert said.startswith("the last") == (validated == [epochs - 2, epochs - 1, epochs] and epochs > 3)


def test_a_plan_of_few_epochs_says_which_it_validates(monkeypatch, split_data_dir, capsys):
    """Validation too dear for every epoch of a long plan, in a plan of a few epochs: it says which ones (it
    used to say "every 6 epochs and the last 3" for 4)."""
    import train

    monkeypatch.setattr(train, "measure_pace", lambda args, *rest: synthetic_pace(100.0, val=25.0))
    args, _ = planned(monkeypatch, split_data_dir, ["--time", "10m"])
    assert 3 < args.epochs < args.val_every + 3  # so validates() picks only the last 3
    assert "validating the last 3 epochs (" in capsys.readouterr().out


@pytest.mark.parametrize("spent,redrawn", [(50.0, True), (75.0, False)])
def test_a_time_run_redraws_its_figures_except_in_its_last_seconds(tmp_path, spent, redrawn):
    """The plan keeps time for the last save, which draws the figures, and for no other drawing: so a --time run
    redraws none in its last FIGURE_SECONDS (here 100 s with 50 or 25 s left) but in the last save. Its first
    save draws them wherever it falls: it times the drawing that the plan keeps time for."""
    import train

    args = train.parse_args(["--time", "100s", "--out-dir", str(tmp_path), "--weights", str(tmp_path / "NiN.pth"),
                             "--class-idx", str(tmp_path / "c.json")])
    clock, run_ = train.Clock(), cpu_run()
    clock.spent_before = spent
    learner = train.Learner(nin.NiN(2, head_width=8), args, 1, run_)
    progress = train.Progress()
    saver = train.Saver(args, ["a", "b"], keep_last=True, saved_epoch=0, trained_on=None, clock=clock, run=run_)
    curves = tmp_path / "curves.png"
    for epoch in (1, 2):
        progress.record(epoch, 0.5, 0.5, None, None, 0.05, 64, 1.0, mixed=True, planned=3)
        saver.saved_at -= train.SAVE_SECONDS  # as if this epoch ended SAVE_SECONDS after the last save...
        saver.drawn_at -= train.FIGURE_SECONDS  # ...and FIGURE_SECONDS after the last drawing
        saver.after_epoch(learner, progress, improved=False, last=False)
        assert (tmp_path / "checkpoint.pth").is_file() and curves.is_file() == (epoch == 1 or redrawn)
        curves.unlink(missing_ok=True)
    progress.record(3, 0.4, 0.6, None, None, 0.01, 64, 1.0, mixed=True, planned=3)
    saver.after_epoch(learner, progress, improved=False, last=True)
    assert curves.is_file()  # the last save draws them


def predicted_seconds(stdout: str) -> float:
    """The whole run's wall time that train.py predicted before its first epoch, in seconds (under 90 s)."""
    match = re.search(r"should take about (\d+) s of the", stdout)
    assert match, stdout
    return float(match.group(1))


def test_a_time_budget_is_kept_and_resume_keeps_what_is_left(split_data_dir, tmp_path):
    """The feature's contract: a real --time run ends within its budget, plus a fixed allowance of 15 s for
    starting Python and importing torch, which happen before train.py can look at a clock. How many epochs fit
    depends on how busy the machine is while the plan measures it (a plan's arithmetic is tested above, on
    synthetic paces), so this test checks what the plan predicts against the budget, not its epochs. Float32 is
    given: with images this small, a CPU without native bf16 sits near the line between --amp auto's short trial
    and its long one, which the resumed run's 15 s could not hold (--amp auto is tested below)."""
    import train

    flags = ["--data-dir", split_data_dir, "--image-size", "80", "--start-size", "64", "--workers", "2", "--amp", "off",
             "--out-dir", tmp_path / "run", "--weights", tmp_path / "NiN.pth", "--class-idx", tmp_path / "c.json"]
    start = time.monotonic()
    result = run("train.py", "--time", "40s", *flags, cwd=tmp_path, process=True)
    assert time.monotonic() - start < 40 + 15
    assert "took " in result.stdout
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    planned = checkpoint["args"]["plan_epochs"]
    # Planned to fill the budget (an epoch here takes a second or a few on a CPU), or all its epochs fit
    assert predicted_seconds(result.stdout) > 40 / 2 or planned == train.EPOCHS
    assert round(checkpoint["predicted_seconds"]) == predicted_seconds(result.stdout)  # the prediction, kept
    assert nin.load_csv(tmp_path / "run" / "metrics.csv")[-1]["planned_epochs"] == str(checkpoint["args"]["epochs"])
    assert checkpoint["args"]["time"] == 40
    took = re.search(r"took (\d+) s", result.stdout)  # train.py's clock, last save included; to the nearest second
    assert took and int(took.group(1)) <= 40, result.stdout

    # As if cut after epoch 1 with 15 s of the budget left, its plan shrunk to 2 epochs by a slow machine: the
    # resumed run plans what is left of the budget, may grow again, and ends its plan properly.
    steps = checkpoint["scheduler"]["last_epoch"] // len(checkpoint["history"])
    checkpoint["epoch"], checkpoint["history"] = 1, checkpoint["history"][:1]
    checkpoint["scheduler"]["last_epoch"] = steps  # the learning rate restarts from there
    checkpoint["best_acc"], checkpoint["best_confusion"] = 0.0, None  # epoch 1 was not validated
    checkpoint["seconds_spent"], checkpoint["args"]["epochs"] = 25.0, 2
    torch.save(checkpoint, tmp_path / "run" / "checkpoint.pth")
    start = time.monotonic()
    resumed = run("train.py", "--resume", "--out-dir", tmp_path / "run", cwd=tmp_path)
    assert time.monotonic() - start < 15 + 5  # the rest of the budget, and seconds to load and save
    assert predicted_seconds(resumed.stdout) >= 25  # the 25 s spent before count
    rows = nin.load_csv(tmp_path / "run" / "metrics.csv")
    saved = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert saved["seconds_spent"] > 25 and saved["args"]["epochs"] == len(rows) >= 2
    assert rows[-1]["planned_epochs"] == str(len(rows))  # the resumed run's plan, in its rows
    assert saved["args"]["plan_epochs"] == planned  # the first plan, kept for the record
    assert "stopping after" not in resumed.stdout and rows[-1]["size"] == "80" and rows[-1]["val_acc"] != ""

    saved["seconds_spent"] = 40.0  # finished, with all its time spent: nothing to train, and nothing wrong
    torch.save(saved, tmp_path / "run" / "checkpoint.pth")
    run("train.py", "--resume", "--out-dir", tmp_path / "run", cwd=tmp_path)
    assert nin.load_csv(tmp_path / "run" / "metrics.csv") == rows
    saved["epoch"], saved["history"] = 1, saved["history"][:1]  # cut after epoch 1 instead, its time spent
    torch.save(saved, tmp_path / "run" / "checkpoint.pth")
    spent = run("train.py", "--resume", "--out-dir", tmp_path / "run", cwd=tmp_path, check=False)
    assert_clean_error(spent, "--time 40 s is spent")
    assert spent.stdout == ""  # refused before any work: no photos listed, nothing timed
    saved["seconds_spent"] = 39.9  # a tenth of a second left: timing this machine takes more than that
    torch.save(saved, tmp_path / "run" / "checkpoint.pth")
    spent = run("train.py", "--resume", "--out-dir", tmp_path / "run", cwd=tmp_path, check=False)
    assert_clean_error(spent, "--time 40 s is spent: 0 s left after timing this machine and loading the photos")
    assert torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)["seconds_spent"] == 39.9  # untouched


def cpu_run():
    import train

    return train.Run(torch.device("cpu"), 0, 1, torch.autocast("cpu", enabled=False),
                     torch.amp.GradScaler("cpu", enabled=False))


def simulated_epoch(clock, pace, args, steps: int, epoch: int, speed: float, save: float = 0.0) -> int:
    """Epoch `epoch` trained at `speed` times the measured pace: the plan after it, as train.py re-plans. Then the
    epoch is validated, at the same pace, and saved in `save` seconds unless it is the last (the plan keeps the
    clock's drawing_save for that one). The clock has to be one whose spent() is its spent_before."""
    import train

    training = speed * pace.training(args, steps, epoch)
    clock.spent_before += training
    args.epochs = clock.epochs_that_fit(pace, args, steps, epoch, training, cpu_run())
    if train.validates(epoch, args.epochs, args.val_every):
        clock.spent_before += speed * pace.val
    if epoch < args.epochs:
        clock.spent_before += save
        clock.saved(save, drew=False)
    return args.epochs


def test_a_plan_follows_the_pace_the_machine_runs_at(monkeypatch):
    """A plan stays put while the machine keeps the measured pace, shrinks while it runs slower, and grows while
    it runs faster: past its first plan (made while the machine was slow), up to the recipe's EPOCHS."""
    import train

    pace, args, steps, budget = simulated_plan(monkeypatch)
    planned = args.plan_epochs = args.epochs
    assert 40 < planned < train.EPOCHS  # all 120 epochs would not fit: there is room to grow
    clock = train.Clock()

    def after_epoch(epoch: int, speed: float) -> int:
        return simulated_epoch(clock, pace, args, steps, epoch, speed)

    def fills(epochs: int, speed: float, after: int, share: float) -> bool:
        """Whether the epochs after `after` of an `epochs`-epoch plan end within `share` of the budget."""
        plan = argparse.Namespace(**{**vars(args), "epochs": epochs})
        return speed * pace.seconds(plan, steps, after + 1) <= share * budget - clock.spent() - speed * pace.val

    assert [after_epoch(epoch, 1.0) for epoch in range(1, 6)] == [planned] * 5  # on pace: the plan stands

    for epoch in range(6, 10):  # a tenth faster than measured: three epochs make the median of the last three
        grown = after_epoch(epoch, 0.9)
    assert planned < grown < train.EPOCHS  # past the first plan, as far as the time left allows
    assert fills(grown, 0.9, 9, train.PLAN_SHARE) and not fills(grown + 1, 0.9, 9, train.PLAN_SHARE)
    clock.spent_before += 1.0  # a second lost between epochs: noise, not enough to re-plan
    assert after_epoch(10, 0.9) == grown

    for epoch in range(11, 15):  # twice as slow
        shrunk = after_epoch(epoch, 2.0)
    assert 14 < shrunk < planned
    # the most epochs that end on time at the slower pace, keeping half the plan's slack for the end
    half_slack = (1 + train.PLAN_SHARE) / 2
    assert fills(shrunk, 2.0, 14, half_slack) and not fills(shrunk + 1, 2.0, 14, half_slack)

    for epoch in range(15, 19):  # twice as fast: room for the whole recipe, and no more
        fastest = after_epoch(epoch, 0.5)
    assert fastest == train.EPOCHS

    clock.spent_before = budget - 0.5
    assert after_epoch(19, 0.5) == 19  # no time left for another epoch: stop


def test_a_plan_grows_only_at_the_slowest_of_its_recent_paces(monkeypatch):
    """Growing is a choice: while one of the last three epochs ran at the measured pace, two fast ones do not grow
    the plan by more than the time they saved (where an epoch is a large share of the budget, a plan grown in a
    fast moment may find no epoch left to shrink in before its end, and stop with its schedule unfinished).
    Three fast ones in a row do."""
    import train

    pace, args, steps, _ = simulated_plan(monkeypatch)
    planned, clock = args.epochs, train.Clock()
    plans = [simulated_epoch(clock, pace, args, steps, epoch, speed)
             for epoch, speed in enumerate([1.0] * 3 + [0.8, 0.8, 1.0] * 3, start=1)]
    assert max(plans) <= planned + 1  # at the median of the last three, 0.8, it grew to all 120
    plans = [simulated_epoch(clock, pace, args, steps, epoch, 0.8) for epoch in range(13, 16)]
    assert plans[-1] > planned + 5


def test_a_plan_grows_only_on_three_paces(monkeypatch):
    """A first epoch pays one-off costs and is not read; the next ones at the first stage's small images may run
    faster than the large ones will: a plan grows only once three epochs say the machine is fast."""
    import train

    pace, args, steps, _ = simulated_plan(monkeypatch)
    planned, clock = args.epochs, train.Clock()
    plans = [simulated_epoch(clock, pace, args, steps, epoch, 0.5) for epoch in range(1, 6)]
    assert plans[:3] == [planned] * 3 and plans[3] > planned


def test_the_saves_between_epochs_count_in_the_plan_from_its_first_epochs(monkeypatch, capsys):
    """The measured pace times training and validation steps; the saves between epochs (the checkpoint, and the
    figures) come on top of them. A plan takes them in from its first epochs and shrinks while its schedule can
    still be laid out again gently, telling the pace it then runs at, rather than near its end, at what would
    read as the full pace."""
    import train

    pace, args, steps, budget = simulated_plan(monkeypatch)
    planned, clock, plans = args.epochs, train.Clock(), []
    while len(plans) < args.epochs:
        plans.append(simulated_epoch(clock, pace, args, steps, len(plans) + 1, speed=1.0, save=0.1))
    assert plans[4] < planned and clock.spent() <= budget
    assert abs(plans[4] - plans[-1]) <= 3  # by epoch 5, about the plan it ends with: the saves counted once
    said = [int(p) for p in re.findall(r"at (\d+)% of the measured pace", capsys.readouterr().out)]
    assert said and max(said) < 100


@pytest.mark.parametrize("final_save", [0.0, 4.0])
@pytest.mark.parametrize("paces", [[0.5] * 20 + [1.0] * 200, [0.5] * 20 + [2.0] * 200, [0.5, 0.5, 0.5, 1.0] * 60,
                                   [0.5] * 5 + [1.0] * 3 + [0.5] * 3 + [2.0] * 200, [1.0, 2.0, 2.0, 0.5] * 60])
def test_a_run_whose_pace_switches_ends_within_its_budget(monkeypatch, capsys, paces, final_save):
    """Planned at the measured pace; the machine then runs at `paces` (times the measured pace), epoch by epoch:
    growing while it is fast must not make the run end past its --time when it slows down again, nor must its
    last save (which draws the figures) when it takes most of the plan's slack."""
    import train

    pace, args, steps, budget = simulated_plan(monkeypatch)
    clock, epoch, plans = train.Clock(), 0, set()
    clock.drawing_save = final_save  # what the last save will take
    while epoch < args.epochs:
        epoch += 1
        plans.add(simulated_epoch(clock, pace, args, steps, epoch, paces[epoch - 1]))
    assert clock.spent() + final_save <= budget
    assert max(plans) > min(plans) and epoch == args.epochs  # it did re-plan, and ended its last plan
    told = capsys.readouterr().out.count("of the measured pace")  # at most every REPLAN_NOTE_SECONDS
    assert 1 <= told <= budget / train.REPLAN_NOTE_SECONDS + 1


@pytest.mark.parametrize("last_speed,fits", [(1.0, 21), (1.6, 20)])
def test_one_last_epoch_past_the_plan_must_fit_at_the_slowest_recent_pace(monkeypatch, last_speed, fits):
    """With 1.4 s left, past the half slack a plan keeps for its end: one more 1.1-s epoch (to end the schedule)
    is squeezed in while the last three epochs ran at the measured pace, but not when one of them ran 1.6 times
    slower (its median still says 1.1 s): no slack is left there to absorb that."""
    import train

    monkeypatch.setattr(train.Clock, "spent", lambda self: self.spent_before)  # no real time passes
    pace, steps = synthetic_pace(step=0.1, val=0.1), 10  # 1 s to train a 160-px epoch, 0.1 s to validate it
    args = train.parse_args(["--time", "100s", "--image-size", "160", "--start-size", "112"])
    args.epochs, args.val_every = 30, 1
    clock = train.Clock()
    clock.slowness, clock.spent_before = [1.0, 1.0, 1.0], 98.5  # its validation still to come: 1.4 s left after it
    training = last_speed * pace.training(args, steps, 20)
    assert clock.epochs_that_fit(pace, args, steps, 20, training, cpu_run()) == fits


def test_a_resumed_plan_measures_every_size_it_may_grow_to(monkeypatch):
    import train

    monkeypatch.setattr(train, "timed", lambda work, run: 0.05)  # each timed step: 0.05 s, no work
    args = train.parse_args(["--time", "100s", "--image-size", "160", "--start-size", "112"])
    args.epochs = args.plan_epochs = 2  # as saved by a run that planned 2 epochs (the machine measured slow)
    pace = train.measure_pace(args, num_classes=3, steps=10, val_photos=10, run=cpu_run())
    assert set(pace.step) == {112, 128, 144, 160}  # every size a re-plan may lay out, not only the last two's
    resumed = train.Clock()
    resumed.spent_before = 50.0  # 45 s of the plan's share left: 81 more epochs at 0.55 s each fit
    resumed.slowness = [1.0] * 3  # and three epochs at the measured pace since it resumed: a plan grows on three
    assert resumed.epochs_that_fit(pace, args, 10, 2, pace.training(args, 10, 2), cpu_run()) == 2 + 81

@pytest.mark.parametrize("probe_share,share,chosen,said", [
    (1.0, 0.5, "bf16", "bf16 autocast on this CPU (a bf16 step took 50% of a float32 one)"),
    (0.5, 0.9, "off", "float32 on this CPU (a bf16 step took 90% of a float32 one)"),
    (4.0, 2.0, "off", "float32 on this CPU (a bf16 step took 200% of a float32 one)"),
    (12.5, None, "off",
     "float32 on this CPU (a bf16 step of 4 images took 12.5 times as long as a float32 one: bf16 looks emulated "
     "here, not timed further)")])
def test_amp_auto_takes_bf16_on_a_cpu_only_where_it_clearly_pays(monkeypatch, capsys, probe_share, share, chosen,
                                                                 said):
    """Decided on the timed steps' share, at the run's batch unless a few images already show bf16 emulated."""
    import train

    timed_batches = []

    def step_seconds(args, classes, amp, run):
        batch = train.per_process_batch(args, run)
        timed_batches.append(batch)
        return 2.0 * ((probe_share if batch == train.PROBE_BATCH else share) if amp == "bf16" else 1.0)

    monkeypatch.setattr(train, "full_size_step_seconds", step_seconds)
    args = train.parse_args([])
    assert train.choose_amp(args, 3, cpu_run()) == chosen
    assert f"--amp auto: {said}" in capsys.readouterr().out
    assert timed_batches == [train.PROBE_BATCH] * 2 + ([] if share is None else [args.batch_size] * 2)
    # under torchrun (3 processes here): the probe's images are per process, and the processes' mean decides
    monkeypatch.setattr(train, "all_reduce_sum", lambda t: t * 3)
    timed_batches.clear()
    assert train.choose_amp(args, 3, dataclasses.replace(cpu_run(), world=3)) == chosen
    assert timed_batches == [train.PROBE_BATCH] * 2 + ([] if share is None else [args.batch_size // 3] * 2)
    assert f"--amp auto: {said}" in capsys.readouterr().out


def test_amp_given_or_on_a_gpu_is_not_timed(capsys, monkeypatch):
    import train

    def timed(*_):
        raise AssertionError("timed")

    monkeypatch.setattr(train, "bf16_share", timed)
    args = train.parse_args([])
    assert train.choose_amp(train.parse_args(["--amp", "off"]), 3, cpu_run()) == "off"  # given: kept
    assert train.choose_amp(train.parse_args(["--amp", "bf16"]), 3, cpu_run()) == "bf16"
    gpu_run = dataclasses.replace(cpu_run(), device=torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100
    assert train.choose_amp(args, 3, gpu_run) == "bf16"
    assert "--amp auto: bf16 autocast on cuda" in capsys.readouterr().out
    for capability, chosen in (((7, 5), "fp16"), ((6, 1), "off")):  # a T4: tensor cores; a GTX 1080: neither
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert train.choose_amp(args, 3, gpu_run) == chosen
        assert f"--amp auto: {train.PRECISION_NAMES[chosen]} on this GPU (compute capability {capability[0]}.x" \
            in capsys.readouterr().out
    mac = dataclasses.replace(cpu_run(), device=torch.device("mps"))
    for version, chosen, said in ((14, "bf16", "bf16 autocast on mps"), (13, "off", "float32 on mps (bf16 autocast")):
        monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor, v=version: v >= major)
        assert train.choose_amp(args, 3, mac) == chosen
        assert f"--amp auto: {said}" in capsys.readouterr().out


def test_a_timing_pays_the_one_off_costs_before_it_times(monkeypatch):
    import train

    now, calls = [0.0], []

    def work():  # each call moves a fake clock: the first by 1 s, like a first step building kernels
        calls.append(now[0])
        now[0] += 1.0 if len(calls) == 1 else 0.01

    monkeypatch.setattr(train.time, "perf_counter", lambda: now[0])
    seconds = train.timed(work, cpu_run())
    assert len(calls) == 1 + train.TIMED_STEPS and seconds == pytest.approx(0.01)  # the mean of the calls after it


def test_resume_keeps_the_runs_amp_unless_the_command_line_gives_one(trained, tmp_path):
    import train

    shutil.copytree(trained["run"], tmp_path / "run")
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    checkpoint["args"]["amp"] = "off"  # as a run started with --amp off
    torch.save(checkpoint, tmp_path / "run" / "checkpoint.pth")
    for given, kept in (([], "off"), (["--amp", "bf16"], "bf16")):
        argv = ["--resume", "--out-dir", str(tmp_path / "run"), *given]
        assert train.resume(train.parse_args(argv), train.explicit_flags(argv))[0].amp == kept


def test_the_random_numbers_on_apples_mps_are_saved_and_put_back(monkeypatch):
    """On MPS the crops and the mixing are drawn on the device: its stream goes into the checkpoint and is put
    back after the timing steps, as the CPU's is (torch's own stream stands in for the Mac's here)."""
    import train

    stream = {"state": torch.tensor([1], dtype=torch.uint8)}
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: stream["state"].clone())
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda state: stream.update(state=state))
    mac = dataclasses.replace(cpu_run(), device=torch.device("mps"))
    with train.random_numbers_put_back(mac.device):
        stream["state"] = torch.tensor([2], dtype=torch.uint8)  # what the timing steps drew
    assert stream["state"].item() == 1
    saved = train.rng_state(mac.device)  # as a checkpoint holds it
    stream["state"] = torch.tensor([3], dtype=torch.uint8)  # the run went on, and was cut
    train.continue_random_numbers(saved, 0, 5, mac)
    assert stream["state"].item() == 1


def test_timing_a_precision_leaves_the_run_and_its_random_numbers_as_they_were():
    import train

    run_, model, x = cpu_run(), nin.NiN(3), torch.rand(2, 3, 64, 64)
    before = torch.random.get_rng_state()
    args = train.parse_args(["--image-size", "64", "--batch-size", "4"])
    assert train.full_size_step_seconds(args, 3, "bf16", run_) > 0
    assert 0 < train.bf16_share(args, 3, run_) < math.inf  # the check below covers both precisions' steps
    assert torch.equal(torch.random.get_rng_state(), before)
    with run_.autocast:  # timed in a copy: the run itself is still in float32
        assert model(x).dtype == torch.float32
    for amp, dtype in (("bf16", torch.bfloat16), ("off", torch.float32)):
        run_.use_amp(amp)
        with run_.autocast:
            assert model(x).dtype == dtype


def test_bf16_autocast_on_the_cpu_learns_and_its_weights_load_in_float32(split_data_dir, tmp_path):
    out = tmp_path / "bf16"
    run("train.py", *TRAIN_FLAGS, "--amp", "bf16", "--device", "cpu", "--data-dir", split_data_dir, "--out-dir", out,
        "--weights", out / "NiN.pth", "--class-idx", out / "c.json", cwd=tmp_path)
    assert max(float(r["val_acc"]) for r in nin.load_csv(out / "metrics.csv")) >= 0.9
    model = nin.load_weights(out / "NiN.pth").model
    assert {p.dtype for p in model.state_dict().values() if p.is_floating_point()} == {torch.float32}


def test_the_batch_is_split_across_processes_unless_per_process():
    import train

    two = dataclasses.replace(cpu_run(), world=2)
    assert train.per_process_batch(train.parse_args(["--batch-size", "64"]), two) == 32
    assert train.per_process_batch(train.parse_args(["--batch-size", "64", "--per-process-batch"]), two) == 64
    with pytest.raises(nin.CLIError, match="fewer than 2 images per process"):
        train.per_process_batch(train.parse_args(["--batch-size", "3"]), two)


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_label_smoothing_reaches_the_loss(smoothing):
    import train

    args = train.parse_args(["--label-smoothing", str(smoothing), "--image-size", "64", "--mixup", "0",
                             "--cutmix", "0"])
    learner = train.Learner(train.make_model(3, args), args, steps_per_epoch=1, run=cpu_run())
    labels = torch.tensor([0, 1, 2, 0])
    loss, logits = learner.step(torch.randint(0, 256, (4, 3, 80, 80), dtype=torch.uint8), labels, 64)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, labels,
                                                                          label_smoothing=smoothing).item(), rel=1e-4)
    other = 0.3 - smoothing  # the loss the other setting would give differs: the flag is what decides it
    assert loss.item() != pytest.approx(torch.nn.functional.cross_entropy(logits, labels,
                                                                          label_smoothing=other).item(), rel=1e-4)


def test_a_run_shorter_than_its_warmup_still_anneals():
    import train

    def factors(total: int, warmup: int) -> list[float]:
        return [train.lr_factor(step, total, "cosine", warmup, step_every=1) for step in range(total)]

    short = factors(10, warmup=20)  # one epoch of ten batches, two epochs of warmup
    assert max(short) == pytest.approx(1.0)  # it reaches the peak...
    assert short[-1] < 0.1  # ...and anneals, rather than warming up to the peak on its last step
    long = factors(1000, warmup=20)  # a long run keeps its warmup as given
    assert long[19] < 1 and long[20] == pytest.approx(1.0)


def test_a_rescheduled_run_still_anneals_to_zero_at_its_new_end():
    import train

    args = train.parse_args(["--epochs", "10", "--image-size", "64", "--warmup-epochs", "1"])
    learner = train.Learner(train.make_model(3, args), args, steps_per_epoch=5, run=cpu_run())
    for _ in range(15):  # three epochs of a ten-epoch cosine
        learner.optimizer.step()
        learner.scheduler.step()
    before = learner.lr
    learner.reschedule(5)
    assert learner.lr < before  # the cosine jumped ahead...
    for _ in range(10):
        learner.optimizer.step()
        learner.scheduler.step()
    assert learner.lr == pytest.approx(0.0, abs=1e-12)  # ...and reaches 0 at the end of epoch 5


def test_the_unmixed_share_is_the_last_epochs_moves_with_a_re_plan_and_stays(monkeypatch):
    import train

    args = train.parse_args(["--epochs", "8", "--image-size", "64", "--unmixed-share", "0.25"])
    learner = train.Learner(train.make_model(3, args), args, steps_per_epoch=1, run=cpu_run())
    mixed = []
    augment = train.augment
    monkeypatch.setattr(train, "augment", lambda *a: (mixed.append(a[-1] is not None), augment(*a))[1])

    def epochs(n: int) -> None:
        for _ in range(n):
            learner.step(torch.randint(0, 256, (4, 3, 72, 72), dtype=torch.uint8), torch.tensor([0, 1, 2, 0]), 64)

    epochs(4)  # of 8: the last 2 would be unmixed
    assert learner.mixes()
    learner.reschedule(6)  # a --time re-plan shrinks the run: its epochs 5 and 6 are the unmixed end now
    epochs(1)
    learner.reschedule(12)  # and grows it again: what is unmixed stays unmixed
    epochs(1)
    assert mixed == [True, True, True, True, False, False] and not learner.mixes()


def test_unmixed_epochs_are_those_after_mixing_stopped_and_older_checkpoints_get_them_from_their_settings():
    import train

    def history(mixed: list[int]) -> list[dict]:
        return [{"epoch": epoch, "mixed": m} for epoch, m in enumerate(mixed, 1)]

    assert train.unmixed_epochs(history([1, 1, 1, 0, 0])) == [4, 5]
    assert train.unmixed_epochs(history([0, 0, 0])) == []  # --mixup 0 --cutmix 0: nothing to mark
    older = {"history": [{"epoch": epoch} for epoch in (1, 2, 3, 4)], "best_acc": 0.0, "best_confusion": None}
    for flags, mixed in ((["--unmixed-share", "0.5"], [1, 1, 0, 0]), (["--mixup", "0", "--cutmix", "0"], [0] * 4)):
        args = train.parse_args(["--epochs", "4", *flags])
        assert [h["mixed"] for h in train.Progress.from_checkpoint(older, args).history] == mixed


def test_a_resumed_run_whose_plan_grows_stays_unmixed(split_data_dir, tmp_path):
    """As a --time plan that grows after a resume: the unmixed end, once begun, does not mix again."""
    out = tmp_path / "run"
    flags = [*TRAIN_FLAGS, "--epochs", "2", "--unmixed-share", "0.5", "--data-dir", split_data_dir, "--out-dir", out,
             "--weights", tmp_path / "NiN.pth", "--class-idx", tmp_path / "c.json"]
    run("train.py", *flags, cwd=tmp_path)  # epoch 2 unmixed
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    checkpoint["args"]["epochs"] = 6  # grown: counted back from 6, the unmixed end would begin after epoch 3
    torch.save(checkpoint, out / "checkpoint.pth")
    result = run("train.py", "--resume", "--out-dir", out, cwd=tmp_path)
    assert [r["mixed"] for r in nin.load_csv(out / "metrics.csv")] == ["1"] + ["0"] * 5
    assert result.stdout.count("  unmixed") == 4  # the resumed epochs 3 to 6


def test_a_machine_that_slows_down_midway_ends_on_time_with_the_schedule_finished(split_data_dir, tmp_path,
                                                                                 monkeypatch):
    """--time's contract when the machine slows down: from the first weights saved on, every normalised batch
    costs 0.15 s more (so that 120 epochs cannot fit in the budget at float32's pace), the plan shrinks, and the
    run still ends within its budget (no process start-up: it runs in this one), at the full image size with
    its schedule finished, not cut. Resumed once finished, it has nothing left to do."""
    start, normalize, save_weights, slow = time.monotonic(), nin.normalize, nin.save_weights, []

    def slowed(batch: torch.Tensor) -> torch.Tensor:
        if slow:
            time.sleep(0.15)
        return normalize(batch)

    def save_then_slow_down(*args, **kwargs) -> None:
        save_weights(*args, **kwargs)
        slow.append(True)
    monkeypatch.setattr(nin, "normalize", slowed)
    monkeypatch.setattr(nin, "save_weights", save_then_slow_down)
    # --amp off: the added 0.15 s outweighs what 120 epochs leave of the budget only at float32's pace; bf16 steps
    # on a CPU with AMX can leave room for all 120 epochs even slowed down, and then there is no shrinking to test
    result = run("train.py", "--time", "25s", "--data-dir", split_data_dir, "--image-size", "80", "--start-size",
                 "64", "--workers", "2", "--amp", "off", "--out-dir", tmp_path / "run", "--weights",
                 tmp_path / "NiN.pth", "--class-idx", tmp_path / "c.json", cwd=tmp_path, check=False)
    seconds = time.monotonic() - start
    plan = re.search(r"recipe, (\d+) epochs? at", result.stdout)
    if "is too short here" in result.stderr or (plan and int(plan.group(1)) < 4):
        # Another torch job on the cores slows the timed steps before the first epoch several times over (the two
        # jobs' threads compete), and they leave a 25 s budget too few epochs to shrink: not this test's case.
        pytest.skip(f"the machine is too busy for a 25 s budget: {(result.stdout + result.stderr).splitlines()[1]}")
    assert result.returncode == 0, result.stderr
    assert seconds < 25 + 3  # the budget, and the seconds of Python before train.py's clock
    assert "of the measured pace" in result.stdout and "stopping after" not in result.stdout
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    rows = nin.load_csv(tmp_path / "run" / "metrics.csv")
    assert checkpoint["args"]["epochs"] == len(rows) < checkpoint["args"]["plan_epochs"]  # shrunk, run to its end
    assert rows[-1]["size"] == "80" and rows[-1]["val_acc"] != ""
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] < 1e-9  # the schedule laid out for the shrunk plan

    run("train.py", "--resume", "--out-dir", tmp_path / "run", cwd=tmp_path)
    assert nin.load_csv(tmp_path / "run" / "metrics.csv") == rows


def test_a_loss_that_becomes_nan_stops_the_run_and_keeps_the_good_weights(split_data_dir, tmp_path, monkeypatch):
    weights = tmp_path / "NiN.pth"
    weights.write_bytes(b"the good weights of an earlier run")
    monkeypatch.setattr(nin, "normalize", lambda batch: torch.full(batch.shape, float("nan")))  # a diverged run
    result = run("train.py", "--data-dir", split_data_dir, *TRAIN_FLAGS, "--epochs", "2", "--weights", weights,
                 "--class-idx", tmp_path / "c.json", "--out-dir", tmp_path / "run", cwd=tmp_path, check=False)
    assert_clean_error(result, "the training loss became nan in epoch 1", "--lr")
    assert weights.read_bytes() == b"the good weights of an earlier run"
    assert not (tmp_path / "run" / "checkpoint.pth").exists() and not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("what", ["NiN.pth", "a checkpoint without its classes"])
def test_weights_file_given_as_a_checkpoint_to_resume(trained, tmp_path, what):
    (tmp_path / "run").mkdir()
    if what == "NiN.pth":
        shutil.copy(trained["weights"], tmp_path / "run" / "checkpoint.pth")
    else:
        checkpoint = torch.load(trained["run"] / "checkpoint.pth", weights_only=True)
        del checkpoint["classes"]
        torch.save(checkpoint, tmp_path / "run" / "checkpoint.pth")
    result = run("train.py", "--resume", "--out-dir", tmp_path / "run", cwd=tmp_path, check=False)
    assert_clean_error(result, "not a checkpoint written by train.py")


def test_special_files_and_dangling_links_among_the_photos_are_skipped(tmp_path, split_data_dir):
    import os

    data = copy_of_split(split_data_dir, tmp_path)
    os.mkfifo(data / "train" / "red" / "pipe.jpg")  # would block open() forever
    (data / "train" / "red" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    result = run("train.py", "--data-dir", data, *TRAIN_FLAGS, "--epochs", "1", "--out-dir", tmp_path / "run",
                 "--weights", tmp_path / "NiN.pth", "--class-idx", tmp_path / "c.json", cwd=tmp_path)
    assert "pipe.jpg: not a regular file" in result.stderr and "gone.jpg: a dangling link" in result.stderr
    assert (tmp_path / "NiN.pth").is_file()


@pytest.mark.parametrize("problem", ["out-dir is a file", "weights is a folder", "class-idx inside a file"])
def test_outputs_that_cannot_be_written_are_refused_before_any_work(split_data_dir, tmp_path, problem):
    (tmp_path / "plain").write_text("a file")
    outputs = {"--out-dir": tmp_path / "run", "--weights": tmp_path / "NiN.pth", "--class-idx": tmp_path / "c.json"}
    if problem == "out-dir is a file":
        outputs["--out-dir"], named = tmp_path / "plain", "is a file, not a folder"
    elif problem == "weights is a folder":
        (tmp_path / "NiN.pth").mkdir()
        named = "is a folder"
    else:
        outputs["--class-idx"], named = tmp_path / "plain" / "c.json", "is a file, not a folder"
    flags = [x for pair in outputs.items() for x in pair]
    result = run("train.py", "--data-dir", split_data_dir, *TRAIN_FLAGS, *flags, cwd=tmp_path, check=False)
    assert_clean_error(result, named)
    assert "epoch" not in result.stdout  # refused before training


def test_a_data_folder_where_the_cache_cannot_be_kept_still_trains(split_data_dir, tmp_path):
    data = copy_of_split(split_data_dir, tmp_path)
    (data / ".cache").write_text("a file where the cache folder would go")  # as a read-only folder would
    result = run("train.py", "--data-dir", data, *TRAIN_FLAGS, "--epochs", "1", "--out-dir", tmp_path / "run",
                 "--weights", tmp_path / "NiN.pth", "--class-idx", tmp_path / "c.json", cwd=tmp_path)
    assert "could not keep the decoded photos" in result.stderr and (tmp_path / "NiN.pth").is_file()


@pytest.mark.parametrize("case,flags", [("one class", []), ("one readable photo", []),
                                        ("one readable photo", ["--no-cache", "--workers", "1"])])
def test_one_class_or_one_photo_is_refused(tmp_path, case, flags):
    data = tmp_path / "data"
    for colour in ("red", "blue") if case == "one readable photo" else ("red",):
        draw(data / "val" / colour / "v.jpg", COLOURS[colour], seed=99)
    if case == "one class":
        for i in range(5):
            draw(data / "train" / "red" / f"{i}.jpg", COLOURS["red"], seed=i)
    else:
        draw(data / "train" / "red" / "0.jpg", COLOURS["red"], seed=0)
        (data / "train" / "blue").mkdir()
        (data / "train" / "blue" / "broken.jpg").write_bytes(b"not a photo")  # skipped: one photo is left
    (tmp_path / "NiN.pth").write_bytes(b"the weights of an earlier run")
    (tmp_path / "c.json").write_text("the classes of an earlier run")
    result = run("train.py", "--data-dir", data, *TRAIN_FLAGS, *flags, "--out-dir", tmp_path / "run",
                 "--weights", tmp_path / "NiN.pth", "--class-idx", tmp_path / "c.json", cwd=tmp_path, check=False)
    # Streamed, the photos are read in a worker process: its error must stay one line.
    assert_clean_error(result, "one class folder" if case == "one class" else "batch norm needs")
    assert (tmp_path / "NiN.pth").read_bytes() == b"the weights of an earlier run"  # the old pair stays a pair
    assert (tmp_path / "c.json").read_text() == "the classes of an earlier run"


def test_resume_after_the_class_folders_changed_is_refused(trained, split_data_dir, tmp_path):
    data = copy_of_split(split_data_dir, tmp_path)
    for half in ("train", "val"):
        shutil.copytree(data / half / "red", data / half / "purple")
    shutil.copytree(trained["run"], tmp_path / "run")
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    checkpoint["args"]["data_dir"] = str(data)
    torch.save(checkpoint, tmp_path / "run" / "checkpoint.pth")
    result = run("train.py", "--resume", "--out-dir", tmp_path / "run", cwd=tmp_path, check=False)
    assert_clean_error(result, "class folders changed")


def test_a_resumed_run_draws_the_same_random_numbers_as_an_uninterrupted_one(split_data_dir, tmp_path):
    """The step schedule does not depend on the number of epochs, so a 2-epoch run resumed for a third must
    repeat the 3-epoch run's third epoch exactly: same crops, same flips, same mixing."""
    # (TRAIN_FLAGS' --amp off matters here too: auto times both precisions in each process, and a close call may
    # go either way.)
    flags = [*TRAIN_FLAGS, "--schedule", "step", "--step-epochs", "100", "--mixup", "0.2", "--data-dir",
             split_data_dir]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    for out, epochs in ((whole, "3"), (cut, "2")):
        run("train.py", *flags, "--epochs", epochs, "--out-dir", out, "--weights", out / "NiN.pth",
            "--class-idx", out / "c.json", cwd=tmp_path)
    checkpoint = torch.load(cut / "checkpoint.pth", weights_only=True)
    checkpoint["args"]["epochs"] = 3
    torch.save(checkpoint, cut / "checkpoint.pth")
    run("train.py", "--resume", "--out-dir", cut, cwd=tmp_path)
    third = [nin.load_csv(out / "metrics.csv")[2] for out in (whole, cut)]
    assert third[0]["train_loss"] == third[1]["train_loss"] and third[0]["val_acc"] == third[1]["val_acc"]


def test_nin_pth_is_written_again_from_the_checkpoint_on_resume(trained, tmp_path):
    """A kill between the checkpoint and NiN.pth: --resume puts the kept weights back first."""
    shutil.copytree(trained["run"], tmp_path / "run")
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    checkpoint["args"]["weights"] = str(tmp_path / "NiN.pth")
    torch.save(checkpoint, tmp_path / "run" / "checkpoint.pth")
    (tmp_path / "NiN.pth").write_bytes(b"a weights file from an earlier epoch, cut short")
    run("train.py", "--resume", "--out-dir", tmp_path / "run", cwd=tmp_path)
    assert same_weights(tmp_path / "NiN.pth", checkpoint["best_model"])


def test_resume_of_a_moved_run_folder_writes_there(split_data_dir, tmp_path):
    """Started with paths relative to one folder, moved, and resumed from another folder."""
    first = tmp_path / "first"
    copy_of_split(split_data_dir, tmp_path)
    run("train.py", "--data-dir", "data", *TRAIN_FLAGS, "--epochs", "1", "--out-dir", "first",
        "--weights", "first/NiN.pth", "--class-idx", "first/c.json", cwd=tmp_path)
    checkpoint = torch.load(first / "checkpoint.pth", weights_only=True)
    checkpoint["args"]["epochs"] = 2  # as if it had been cut short
    torch.save(checkpoint, first / "checkpoint.pth")
    shutil.move(first, tmp_path / "moved")
    (tmp_path / "moved" / "NiN.pth").unlink()  # the resumed run must write it, and in its new place
    (tmp_path / "elsewhere").mkdir()
    run("train.py", "--resume", "--out-dir", tmp_path / "moved", cwd=tmp_path / "elsewhere")
    assert not first.exists()  # nothing written back into the old place
    assert len(nin.load_csv(tmp_path / "moved" / "metrics.csv")) == 2
    resumed = torch.load(tmp_path / "moved" / "checkpoint.pth", weights_only=True)
    assert same_weights(tmp_path / "moved" / "NiN.pth", resumed["best_model"])


def test_streaming_skips_an_unreadable_photo_too(tmp_path, split_data_dir):
    data = copy_of_split(split_data_dir, tmp_path)
    good = next((data / "train" / "red").glob("*.jpg")).read_bytes()
    (data / "train" / "red" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    result = run("train.py", "--data-dir", data, *TRAIN_FLAGS, "--epochs", "2", "--no-cache", "--workers", "0",
                 "--out-dir", tmp_path / "run", "--weights", tmp_path / "NiN.pth", "--class-idx", tmp_path / "c.json",
                 cwd=tmp_path)
    assert result.stderr.count("truncated.jpg") == 1  # warned once, not every epoch
    assert len(nin.load_csv(tmp_path / "run" / "metrics.csv")) == 2
