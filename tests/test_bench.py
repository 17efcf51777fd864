"""bench/: the sweep driver (the throughput benchmark prints timings only, so it is run by hand)."""

from __future__ import annotations

import csv

from conftest import TRAIN_FLAGS, assert_clean_error, run


def test_sweep_tabulates_each_config_over_seeds_and_reuses_finished_runs(split_data_dir, tmp_path):
    flags = " ".join([*TRAIN_FLAGS, "--epochs", "1"])
    args = ["--data-dir", split_data_dir, "--runs-dir", tmp_path / "sweep", "--seeds", "0,1", "--parallel", "2",
            f"plain={flags}", f"narrow={flags} --head-width 0", "broken=--epochs 0"]
    first = run("bench/sweep.py", *args, cwd=tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "results.csv", newline="")))
    assert sorted(r["name"] for r in rows) == ["narrow", "plain"]  # the failed config is left out...
    assert "broken seed 0 failed" in first.stderr  # ...and named
    for row in rows:
        each = [float(b) for b in row["best_each"].split()]
        assert int(row["seeds"]) == 2 and len(each) == 2
        assert abs(float(row["best_mean"]) - sum(each) / 2) < 1e-4
    assert first.stdout.count(" seed ") == 4
    for seed in (0, 1):
        assert (tmp_path / "sweep" / f"plain-s{seed}" / "NiN.pth").is_file()
    again = run("bench/sweep.py", *args[:-1], cwd=tmp_path, timeout=60)  # nothing left to train: seconds
    assert again.stdout.split("\n\n")[-1] == first.stdout.split("\n\n")[-1]


def test_sweep_refuses_a_config_without_a_name(tmp_path):
    assert_clean_error(run("bench/sweep.py", "--epochs 3", cwd=tmp_path, check=False), "NAME=FLAGS")
