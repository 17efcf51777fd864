"""What does more time buy? The pooled out-of-fold accuracy of `train.py --time` runs against their budget,
one bench/cv.py folder per budget, as a table and a plot; one line per machine with --series.

    python bench/cv.py --folds 5 --out runs/cv-time30 -- --time 30m      # one folder per budget, then:
    python bench/budgets.py runs/cv-time10 runs/cv-time30 runs/cv-time60 --save docs/accuracy_vs_time.png
    python bench/budgets.py --series "laptop" runs/a10 runs/a30 --series "desktop" runs/b10 runs/b30

For each folder (with its line's label, given --series): the budget, the folds finished, the pooled last-epoch
accuracy over their photos with its 95 % interval, and the longest fold's train.py wall time (every piece of a
cut and resumed fold counted, as bench/cv.py records it), which says whether every fold kept its budget.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's modules
sys.path.insert(0, str(Path(__file__).resolve().parent))  # cv.py, beside this file
import cv
import nin
import train


def parse_args() -> argparse.Namespace:
    p = nin.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="*", type=Path, help="bench/cv.py --out folders of train.py --time runs")
    p.add_argument("--series", nargs="+", action="append", default=[], metavar=("LABEL", "DIR"),
                   help="a line of its own: its label (the machine, say), then its folders; repeat for each line")
    p.add_argument("--save", type=Path, default=nin.RUNS_DIR / "accuracy_vs_time.png",
                   help="where the plot goes (default: %(default)s)")
    args = p.parse_args()
    if any(len(series) < 2 for series in args.series):
        p.error("--series takes a label and then at least one folder")
    if not args.folders and not args.series:
        p.error("give the folders to compare (or --series LABEL DIR...)")
    nin.check_output_file(args.save, "--save")
    return args


def labelled_folders(args: argparse.Namespace) -> dict[str, list[Path]]:
    """Each line of the plot, in the order given: its label ("" for the folders given without --series) and its
    folders (a label given twice is one line)."""
    lines = {"": list(args.folders)} if args.folders else {}
    for label, *folders in args.series:
        lines.setdefault(label, []).extend(Path(d) for d in folders)
    return lines


def budget_row(folder: Path, series: str) -> dict:
    """One cross-validation folder: its line's label, its --time budget (seconds), folds, pooled accuracy and
    slowest fold."""
    if not (folder / "cv.json").is_file() or not (folder / "folds.csv").is_file():
        raise nin.CLIError(f"{folder} holds no finished bench/cv.py run (cv.json and folds.csv)")
    settings = json.loads((folder / "cv.json").read_text())
    budget = train.parse_args(settings["train_flags"]).time
    if budget is None:
        raise nin.CLIError(f"{folder}: its train.py flags have no --time ({' '.join(settings['train_flags'])})")
    folds = nin.load_csv(folder / "folds.csv")
    correct, photos = sum(int(r["last_correct"]) for r in folds), sum(int(r["photos"]) for r in folds)
    return {"series": series, "budget": budget, "folds": f"{len(folds)} of {settings['folds']}", "correct": correct,
            "photos": photos, "interval": cv.wilson(correct, photos),
            "slowest": max(float(r["train_seconds"]) for r in folds)}


def table(rows: list[dict]) -> str:
    """A Markdown table, with a first column for the lines' labels when there are any."""
    labelled = any(r["series"] for r in rows)
    header = ["--time", "folds", "pooled out-of-fold accuracy, last epoch (95 % interval)", "slowest fold / budget"]
    lines = [["series"] * labelled + header, ["---"] * (labelled + len(header))]
    lines += [[r["series"]] * labelled + [train.format_duration(r["budget"]), r["folds"],
                                          cv.accuracy_text(r["correct"], r["photos"]),
                                          f"{r['slowest']:,.1f} s / {r['budget']:,.0f} s"] for r in rows]
    return "\n".join(f"| {' | '.join(cells)} |" for cells in lines)


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy against budget (log scale), one line with 95 % bars per label."""
    plt = nin.pyplot_for_files()
    fig, ax = plt.subplots(figsize=(6, 4))
    for series in dict.fromkeys(r["series"] for r in rows):
        line = [r for r in rows if r["series"] == series]
        minutes = [r["budget"] / 60 for r in line]
        accuracy = [100 * r["correct"] / r["photos"] for r in line]
        below = [a - 100 * r["interval"][0] for a, r in zip(accuracy, line, strict=True)]
        above = [100 * r["interval"][1] - a for a, r in zip(accuracy, line, strict=True)]
        ax.errorbar(minutes, accuracy, yerr=[below, above], fmt="o-", capsize=4, label=series or None)
        for x, y in zip(minutes, accuracy, strict=True):
            ax.annotate(f"{y:.1f} %", (x, y), textcoords="offset points", xytext=(8, -4), fontsize=8)
    budgets = sorted({r["budget"] for r in rows})
    ax.set_xscale("log")
    ax.set_xticks([b / 60 for b in budgets], [train.format_duration(b) for b in budgets])
    ax.minorticks_off()
    ax.set(xlabel="python train.py --time", ylabel="pooled out-of-fold accuracy (%)")
    ax.set_title("what more time buys (last epoch; bars: 95 % interval)", fontsize=10)
    ax.grid(alpha=0.3)
    if any(r["series"] for r in rows):
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    nin.save_figure(fig, path)


def main() -> None:
    args = parse_args()
    rows = [row for series, folders in labelled_folders(args).items()
            for row in sorted((budget_row(folder, series) for folder in folders), key=lambda r: r["budget"])]
    print(table(rows))
    plot(rows, args.save)
    print(f"wrote {args.save}")


if __name__ == "__main__":
    nin.run_cli(main)
