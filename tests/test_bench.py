"""bench/: the sweep driver, cross-validation, the budget table, the GPU data copy and the images that show no
flower (the throughput benchmark only prints timings: it is run by hand)."""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import COLOURS, TRAIN_FLAGS, assert_clean_error, copy_of_split, draw, make_dataset, run

import nin


def test_sweep_tabulates_each_config_over_seeds_and_reuses_finished_runs(split_data_dir, tmp_path):
    flags = " ".join([*TRAIN_FLAGS, "--epochs", "1"])
    args = ["--data-dir", split_data_dir, "--runs-dir", tmp_path / "sweep", "--seeds", "0,1", "--parallel", "2",
            f"plain={flags}", "broken=--epochs 0"]
    first = run("bench/sweep.py", *args, cwd=tmp_path)
    rows = nin.load_csv(tmp_path / "sweep" / "results.csv")
    assert [r["name"] for r in rows] == ["plain"]  # the failed config is left out...
    assert "broken seed 0 failed" in first.stderr  # ...and named
    each = [float(b) for b in rows[0]["best_each"].split()]
    assert int(rows[0]["seeds"]) == 2 and len(each) == 2
    assert abs(float(rows[0]["best_mean"]) - sum(each) / 2) < 1e-4
    assert sum(line.split()[1:2] == ["seed"] for line in first.stdout.splitlines()) == 2  # a line per run
    for seed in (0, 1):
        assert (tmp_path / "sweep" / f"plain-s{seed}" / "NiN.pth").is_file()
    trained_at = [(tmp_path / "sweep" / f"plain-s{seed}" / "NiN.pth").stat().st_mtime_ns for seed in (0, 1)]
    again = run("bench/sweep.py", *args[:-1], cwd=tmp_path)
    assert again.stdout.split("\n\n")[-1] == first.stdout.split("\n\n")[-1]
    assert [(tmp_path / "sweep" / f"plain-s{seed}" / "NiN.pth").stat().st_mtime_ns for seed in (0, 1)] == trained_at


def test_sweep_leaves_out_a_run_without_val_photos(split_data_dir, tmp_path):
    data = copy_of_split(split_data_dir, tmp_path)
    for photo in list((data / "val").glob("*/*")):  # as split_data.py --val-ratio 0 leaves it
        photo.rename(data / "train" / photo.parent.name / f"v-{photo.name}")
    flags = " ".join([*TRAIN_FLAGS, "--epochs", "1"])
    result = run("bench/sweep.py", "--data-dir", data, "--runs-dir", tmp_path / "sweep", "--seeds", "0",
                 f"all={flags}", cwd=tmp_path, check=False)
    assert "all seed 0 has no validated epoch" in result.stderr
    assert result.returncode == 2 and "every run failed" in result.stderr and "Traceback" not in result.stderr


def test_sweep_refuses_a_config_without_a_name(tmp_path):
    assert_clean_error(run("bench/sweep.py", "--epochs 3", cwd=tmp_path, check=False), "NAME=FLAGS")


def test_cross_validation_scores_every_photo_once_and_pools_them(tmp_path):
    source = make_dataset(tmp_path / "source", per_class=12)
    red = sorted((source / "red").iterdir())[0]
    red.rename(source / "blue" / f"mislabelled-{red.name}")  # at least one mistake: a suspect label to list
    args = ["--folds", "2", "--parallel", "2", "--source", source, "--out", tmp_path / "cv", "--", *TRAIN_FLAGS,
            "--epochs", "1"]
    first = run("bench/cv.py", *args, cwd=tmp_path)
    rows = nin.load_csv(tmp_path / "cv" / "oof_predictions.csv")
    assert sorted(r["photo"] for r in rows) == sorted(f"{c}/{f.name}" for c in COLOURS for f in (source / c).iterdir())
    assert {r["fold"] for r in rows} == {"0", "1"}
    for r in rows:  # probabilities that sum to one, and the prediction is their argmax
        probs = {c: float(r[f"p_{c}"]) for c in COLOURS}
        assert sum(probs.values()) == pytest.approx(1, abs=1e-4) and r["predicted"] == max(probs, key=probs.get)
    correct = sum(r["predicted"] == r["label"] for r in rows)
    assert f"last epoch: {correct / 36:.2%} ({correct}/36; 95 % interval" in first.stdout
    assert (tmp_path / "cv" / "cv.md").read_text() in first.stdout
    folds = nin.load_csv(tmp_path / "cv" / "folds.csv")
    assert [int(f["photos"]) for f in folds] == [sum(r["fold"] == str(i) for r in rows) for i in (0, 1)]
    suspects = nin.load_csv(tmp_path / "cv" / "suspect_labels.csv")
    assert 1 <= len(suspects) == min(36 - correct, 24) and all(s["folder"] != s["predicted"] for s in suspects)
    assert [float(s["probability"]) for s in suspects] == sorted((float(s["probability"]) for s in suspects),
                                                                 reverse=True)
    assert (tmp_path / "cv" / "suspect_labels.png").read_bytes()[:4] == b"\x89PNG"
    for figure in ("oof_confusion.png", "oof_reliability.png"):
        assert (tmp_path / "cv" / figure).read_bytes()[:4] == b"\x89PNG" and figure in first.stdout
    # Its calibration line fits the temperature that predict.py --calibrate would store from the same file...
    shutil.copy(tmp_path / "cv" / "fold-0" / "NiN.pth", tmp_path / "copy.pth")
    run("predict.py", "--calibrate", tmp_path / "cv" / "oof_predictions.csv", "--weights", tmp_path / "copy.pth",
        "--class-idx", tmp_path / "cv" / "fold-0" / "class_idx.json", cwd=tmp_path)
    temperature = nin.load_weights(tmp_path / "copy.pth").calibration.temperature
    assert f"fitted on all these photos: {temperature:.3f};" in first.stdout
    assert "Each fold calibrated from the other folds: ECE " in first.stdout  # ...and calibrates each fold apart
    trained_at = [(tmp_path / "cv" / f"fold-{i}" / "NiN.pth").stat().st_mtime_ns for i in (0, 1)]
    again = run("bench/cv.py", *args, cwd=tmp_path)  # finished folds are read, not trained again
    assert "training" not in again.stdout
    assert again.stdout.split("# Cross")[1] == first.stdout.split("# Cross")[1]
    assert [(tmp_path / "cv" / f"fold-{i}" / "NiN.pth").stat().st_mtime_ns for i in (0, 1)] == trained_at
    # A fold's predictions are all the pooled figures need: without its weights (deleted for space, or the fold
    # carried to another machine) the same tables come out, and only its suspects go undrawn, with a warning.
    (tmp_path / "cv" / "fold-0" / "NiN.pth").unlink()
    table = (tmp_path / "cv" / "cv.md").read_text()
    (tmp_path / "cv" / "cv.md").unlink()  # written again, from the folds
    without = run("bench/cv.py", *args, cwd=tmp_path)
    assert "training" not in without.stdout and (tmp_path / "cv" / "cv.md").read_text() == table
    assert ("fold 0's weights are gone" in without.stderr) == any(s["fold"] == "0" for s in suspects)


def test_cross_validation_resumes_a_fold_cut_short(tmp_path):
    source = make_dataset(tmp_path / "source", per_class=12)
    args = ["--folds", "2", "--parallel", "2", "--source", source, "--out", tmp_path / "cv", "--", *TRAIN_FLAGS,
            "--epochs", "2"]
    run("bench/cv.py", *args, cwd=tmp_path)
    fold = tmp_path / "cv" / "fold-1"
    checkpoint = torch.load(fold / "run" / "checkpoint.pth", weights_only=True)
    checkpoint["epoch"], checkpoint["history"] = 1, checkpoint["history"][:1]  # as if killed after epoch 1
    torch.save(checkpoint, fold / "run" / "checkpoint.pth")
    (fold / "result.json").unlink()
    # ...and as if that run, 100 s into the fold, was killed outright 50 s after it started: its time still counts
    killed_at = (fold / "log.txt").stat().st_mtime
    (fold / "train_time.json").write_text(json.dumps({"seconds": 100.0, "running_since": killed_at - 50}))
    started = time.time()
    again = run("bench/cv.py", *args, cwd=tmp_path)
    assert "fold 1: training" in again.stdout and "fold 0: training" not in again.stdout
    assert "resumed" in (fold / "log.txt").read_text()
    result = json.loads((fold / "result.json").read_text())
    assert result["epochs"] == 2
    assert 150 < result["train_seconds"] < 150 + (time.time() - started)
    assert json.loads((fold / "train_time.json").read_text())["running_since"] is None


@pytest.mark.parametrize("flags,named", [(["--folds", "1"], "--folds"), (["--parallel", "0"], "--parallel"),
                                         (["--", "--epochs", "0"], "train.py: error: --epochs"),  # whose flag it is
                                         (["--", "--data-dir", "x"], "--data-dir")])
def test_cross_validation_refuses_bad_flags(tmp_path, flags, named):
    assert_clean_error(run("bench/cv.py", "--out", tmp_path / "cv", *flags, cwd=tmp_path, check=False), named)
    assert not (tmp_path / "cv").exists()


def test_cross_validation_refuses_folds_without_photos_before_training(tmp_path):
    source = make_dataset(tmp_path / "source", per_class=2)  # 6 photos cannot fill 8 folds
    result = run("bench/cv.py", "--folds", "8", "--source", source, "--out", tmp_path / "cv", cwd=tmp_path,
                 check=False)
    assert_clean_error(result, "would hold no photo")
    assert not (tmp_path / "cv").exists()


def test_a_mistyped_source_leaves_the_out_folder_usable(tmp_path):
    result = run("bench/cv.py", "--source", tmp_path / "sorce", "--out", tmp_path / "cv", cwd=tmp_path, check=False)
    assert_clean_error(result, "sorce")
    assert not (tmp_path / "cv" / "cv.json").exists()  # the corrected command is not refused as another recipe


def test_cross_validation_refuses_an_out_inside_its_source_and_a_source_inside_its_out(tmp_path):
    source = make_dataset(tmp_path / "source", per_class=2)  # a second run would take cv/ for a class
    assert_clean_error(run("bench/cv.py", "--source", source, "--out", source / "cv", cwd=tmp_path, check=False),
                       "inside the source folder")
    assert not (source / "cv").exists()
    fold_photos = make_dataset(tmp_path / "cv" / "fold-1" / "data" / "train", per_class=2)
    assert_clean_error(run("bench/cv.py", "--source", fold_photos, "--out", tmp_path / "cv", cwd=tmp_path,
                           check=False), "inside a fold folder")
    assert len(list(fold_photos.rglob("*.jpg"))) == 3 * 2 and not (tmp_path / "cv" / "cv.json").exists()


def test_cross_validation_refuses_to_mix_recipes_in_one_folder(tmp_path):
    source = make_dataset(tmp_path / "source", per_class=4)
    (tmp_path / "cv").mkdir()
    (tmp_path / "cv" / "cv.json").write_text(json.dumps({"folds": 5}))
    result = run("bench/cv.py", "--source", source, "--out", tmp_path / "cv", "--", "--epochs", "3", cwd=tmp_path,
                 check=False)
    assert_clean_error(result, "other settings")


def fake_cross_validation(folder, flags: list[str], folds: list[tuple[int, int, float]]) -> None:
    """A bench/cv.py folder as its run leaves it: cv.json, and folds.csv with (photos, right, seconds) per fold."""
    folder.mkdir()
    (folder / "cv.json").write_text(json.dumps({"folds": 5, "split_seed": 0, "source": "x", "train_flags": flags}))
    with open(folder / "folds.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["fold", "photos", "last_correct", "train_seconds"])
        writer.writeheader()
        writer.writerows({"fold": i, "photos": n, "last_correct": right, "train_seconds": s}
                         for i, (n, right, s) in enumerate(folds))


def test_budgets_pool_each_cross_validation_and_plot_them_by_time(tmp_path):
    fake_cross_validation(tmp_path / "long", ["--time", "1h"], [(600, 540, 3590.0), (700, 610, 3580.0)])
    fake_cross_validation(tmp_path / "short", ["--time=10m", "--seed", "1"], [(650, 500, 601.5)])
    result = run("bench/budgets.py", tmp_path / "long", tmp_path / "short", "--save", tmp_path / "b.png",
                 cwd=tmp_path)
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 10 min") or line.startswith("| 1 h")]
    assert rows[0].startswith("| 10 min | 1 of 5 | 76.92% (500/650;")  # sorted by budget, not by argument
    assert rows[0].endswith("| 601.5 s / 600 s |")  # the slowest fold, over its budget, shows it
    assert rows[1].startswith("| 1 h 00 min | 2 of 5 | 88.46% (1,150/1,300;")
    assert rows[1].endswith("| 3,590.0 s / 3,600 s |")
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"

    fake_cross_validation(tmp_path / "no-time", ["--epochs", "3"], [(10, 9, 5.0)])
    assert_clean_error(run("bench/budgets.py", tmp_path / "no-time", cwd=tmp_path, check=False), "no --time")


def test_budgets_draw_one_line_per_series_each_sorted_by_time(tmp_path):
    fake_cross_validation(tmp_path / "a30", ["--time", "30m"], [(650, 500, 1790.0)])
    fake_cross_validation(tmp_path / "b30", ["--time", "30m"], [(650, 585, 1790.0)])
    fake_cross_validation(tmp_path / "b10", ["--time", "10m"], [(650, 520, 599.0)])
    fake_cross_validation(tmp_path / "a10", ["--time", "10m"], [(650, 480, 590.0)])
    result = run("bench/budgets.py", "--series", "slow host", tmp_path / "a30", "--series", "fast host",
                 tmp_path / "b30", tmp_path / "b10", "--series", "slow host", tmp_path / "a10", "--save",
                 tmp_path / "b.png", cwd=tmp_path)
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "host" in line]
    assert [row.split(" | ")[:3] for row in rows] == [["| slow host", "10 min", "1 of 5"],  # a label twice: one line
                                                     ["| slow host", "30 min", "1 of 5"],
                                                     ["| fast host", "10 min", "1 of 5"],
                                                     ["| fast host", "30 min", "1 of 5"]]
    assert "| 90.00% (585/650;" in rows[3]
    assert (tmp_path / "b.png").is_file()
    for flags, named in [(["--series", "lonely"], "--series takes a label"), ([], "give the folders")]:
        assert_clean_error(run("bench/budgets.py", *flags, cwd=tmp_path, check=False), named)


@pytest.mark.parametrize("script, flags, named", [
    ("bench/throughput.py", ["--steps", "0"], "--steps"), ("bench/throughput.py", ["--threads", "2,0"], "--threads"),
    ("bench/throughput.py", ["--threads", "two"], "not comma-separated"),
    ("bench/sweep.py", ["--seeds", "0,x", "a="], "not comma-separated")])
def test_bench_scripts_refuse_bad_flags(tmp_path, script, flags, named):
    assert_clean_error(run(script, *flags, cwd=tmp_path, check=False), named)


def test_gpu_data_squares_every_photo_and_never_replaces_a_folder_it_did_not_write(tmp_path):
    source = make_dataset(tmp_path / "source", per_class=3)
    draw(source / "red" / "000.png", COLOURS["red"], seed=9)  # the same name but for the format: its own square
    photos = sorted(p.relative_to(source) for p in source.rglob("*.jpg"))
    for _ in range(2):  # the second run replaces the first one's folder
        run("bench/gpu_data.py", source, tmp_path / "squares", "--side", "64", cwd=tmp_path)
    squares = sorted((tmp_path / "squares").rglob("*.jpg"))
    assert [p.relative_to(tmp_path / "squares") for p in squares] == sorted([*photos, Path("red/000.png.jpg")])
    from PIL import Image

    side = nin.resize_size(64)  # the square train.py caches for --image-size 64
    assert all(Image.open(p).size == (side, side) for p in squares)
    swapped = run("bench/gpu_data.py", tmp_path / "squares", source, cwd=tmp_path, check=False)
    assert_clean_error(swapped, "not written by this script")
    inside = run("bench/gpu_data.py", source, source / "squares", cwd=tmp_path, check=False)
    assert_clean_error(inside, "inside")
    assert sorted(p.relative_to(source) for p in source.rglob("*.jpg")) == photos  # the photos are all there


def test_not_flowers_writes_the_same_twelve_readable_images_each_time(tmp_path):
    for out in ("a", "b"):
        run("bench/not_flowers.py", tmp_path / out, cwd=tmp_path)
    written = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(written) == 12 and written == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert all((tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes() for name in written)
    assert all(nin.load_image(tmp_path / "a" / name).size[0] > 0 for name in written)
    (tmp_path / "file").write_text("")
    assert_clean_error(run("bench/not_flowers.py", tmp_path / "file" / "out", cwd=tmp_path, check=False),
                       "is a file, not a folder")
