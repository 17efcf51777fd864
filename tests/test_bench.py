"""bench/: the sweep driver (the throughput benchmark prints timings only, so it is run by hand)."""

from __future__ import annotations

import csv

from conftest import TRAIN_FLAGS, assert_clean_error, run


def test_sweep_tabulates_each_config_over_seeds_and_reuses_finished_runs(split_data_dir, tmp_path):
    flags = " ".join([*TRAIN_FLAGS, "--epochs", "1"])
    args = ["--data-dir", split_data_dir, "--runs-dir", tmp_path / "sweep", "--seeds", "0,1", "--parallel", "2",
            f"plain={flags}", "broken=--epochs 0"]
    first = run("bench/sweep.py", *args, cwd=tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "results.csv", newline="")))
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


def test_sweep_refuses_a_config_without_a_name(tmp_path):
    assert_clean_error(run("bench/sweep.py", "--epochs 3", cwd=tmp_path, check=False), "NAME=FLAGS")
