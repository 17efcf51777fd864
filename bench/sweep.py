"""Train several configurations of train.py, each with several seeds, some runs at a time, and tabulate them.

    python bench/sweep.py --seeds 0,1,2 --parallel 4 base= narrow="--head-width 0" short="--epochs 60"

Each NAME=FLAGS trains once per seed into --runs-dir/NAME-sSEED (its own NiN.pth, metrics.csv, log.txt);
a run that already finished there is read, not trained again. Prints one line per run as it ends, then
a table sorted by mean best val accuracy (mean, standard deviation and each seed; the last epoch's mean;
wall time per run, which counts the other runs sharing the machine), and writes it as CSV to --csv.
Running several at a time pays on a GPU, which one small-batch NiN run leaves mostly idle; on a CPU use 1.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's modules
sys.path.insert(0, str(Path(__file__).resolve().parent))  # cv.py, beside this file
import cv
import nin
import train


def parse_args() -> argparse.Namespace:
    p = nin.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", metavar="NAME=FLAGS", help="a name and train.py flags (may be empty)")
    p.add_argument("--seeds", type=cv.whole_numbers, default=[0, 1, 2], help="comma-separated (default: 0,1,2)")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=nin.DATA_DIR, help="default: %(default)s")
    p.add_argument("--runs-dir", type=Path, default=nin.RUNS_DIR / "sweep", help="default: %(default)s")
    p.add_argument("--csv", type=Path, default=None, help="default: results.csv in --runs-dir")
    args = p.parse_args()
    if args.parallel < 1:
        p.error("--parallel must be at least 1")
    try:
        args.configs = dict(parse_config(c) for c in args.configs)
    except ValueError as error:
        p.error(str(error))
    return args


def parse_config(text: str) -> tuple[str, list[str]]:
    name, sep, flags = text.partition("=")
    if not sep or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"{text!r} is not NAME=FLAGS (a name of letters, digits, - and _)")
    return name, shlex.split(flags)


def one_run(name: str, flags: list[str], seed: int, args: argparse.Namespace, threads: int | None) -> dict | None:
    """One train.py run (or the finished one already in its folder); its figures as a row, None if it failed."""
    run_dir = args.runs_dir / f"{name}-s{seed}"
    done = run_dir / "done.txt"
    if not done.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        code = cv.run_train(args.data_dir, run_dir, run_dir, ["--seed", str(seed), *flags], threads)
        if code != 0:
            nin.warn(f"{name} seed {seed} failed (exit {code}): see {run_dir / 'log.txt'}")
            return None
        done.write_text(f"{time.perf_counter() - start:.1f}\n")
    history = nin.load_csv(run_dir / "metrics.csv")
    best = train.best_validated(history)
    if best is None:
        nin.warn(f"{name} seed {seed} has no validated epoch (no val photos in --data-dir?): left out")
        return None
    return {"name": name, "seed": seed, "best": float(best["val_acc"]), "best_epoch": int(best["epoch"]),
            "last": float(history[-1]["val_acc"]), "epochs": len(history), "wall_s": float(done.read_text())}


def summarise(name: str, flags: list[str], runs: list[dict]) -> dict:
    best = [r["best"] for r in sorted(runs, key=lambda r: r["seed"])]
    return {"name": name, "flags": shlex.join(flags), "seeds": len(best),
            "best_mean": round(statistics.mean(best), 4),
            "best_sd": round(statistics.stdev(best), 4) if len(best) > 1 else 0.0,
            "best_each": " ".join(f"{b:.4f}" for b in best),
            "last_mean": round(statistics.mean(r["last"] for r in runs), 4),
            "wall_s": round(statistics.mean(r["wall_s"] for r in runs), 1)}


def save_table(args: argparse.Namespace, runs: dict[str, list[dict]]) -> list[dict]:
    """The summary rows of the configurations with a finished run, best first, also written to the CSV."""
    table = sorted((summarise(name, args.configs[name], runs[name]) for name in args.configs if runs[name]),
                   key=lambda row: -row["best_mean"])
    if table:
        nin.save_csv(table, args.csv or args.runs_dir / "results.csv")
    return table


def main() -> None:
    args = parse_args()
    threads = cv.threads_per_run(args.parallel)
    jobs = [(name, flags, seed) for name, flags in args.configs.items() for seed in args.seeds]
    runs: dict[str, list[dict]] = {name: [] for name in args.configs}
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = [pool.submit(one_run, *job, args, threads) for job in jobs]
        for future in as_completed(futures):
            run = future.result()
            if run is None:
                continue
            runs[run["name"]].append(run)
            save_table(args, runs)  # after every run, so a sweep cut short still leaves its table
            print(f"{run['name']:<12} seed {run['seed']}  best {run['best']:.4f} (epoch {run['best_epoch']})  "
                  f"last {run['last']:.4f}  {run['wall_s']:.0f} s", flush=True)
    table = save_table(args, runs)
    print(f"\n{'config':<12} {'best val: mean':>14} {'sd':>6}  {'each seed':<22} {'last':>6} {'s/run':>6}  flags")
    for row in table:
        print(f"{row['name']:<12} {row['best_mean']:14.4f} {row['best_sd']:6.4f}  {row['best_each']:<22} "
              f"{row['last_mean']:6.4f} {row['wall_s']:6.0f}  {row['flags']}")
    if not table:
        raise nin.CLIError("every run failed")


if __name__ == "__main__":
    nin.run_cli(main)
