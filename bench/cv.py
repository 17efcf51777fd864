"""K-fold cross-validation of a train.py recipe: every photo is scored once, by a model that never saw it.

    python bench/cv.py --folds 5 -- --epochs 42 --image-size 112     # train.py flags after the --

The photos of --source are cut into K folds by the number their bytes give them (split_data.py --folds K
--fold I). For each fold, train.py trains on the other folds with --keep last, and the last epoch's weights
score the fold's photos through nin.eval_tensor, exactly as predict.py would. Pooled over the folds, that is
an accuracy on all the photos (a 95 % interval a third as wide as one 10 % val split's), with no epoch, seed or
recipe chosen on the photos it is measured on. The best epoch of each fold is reported too, labelled
optimistic: it was chosen on the photos it is scored on.

Writes into --out (and prints cv.md):
  cv.md, folds.csv          per fold: photos, best- and last-epoch val accuracy, wall time; the pooled figures,
                            and how well one temperature calibrates the probabilities (predict.py --calibrate)
  oof_predictions.csv       every photo: its fold, its folder's label, its out-of-fold probabilities
  oof_confusion.png         their confusion matrix, and oof_reliability.png, their reliability diagram when each
                            fold is calibrated from the other folds (predict.py --eval draws both for one folder)
  suspect_labels.csv/.png   the photos whose prediction most confidently disagrees with their folder, with the
                            class map of the predicted class: where to look first for mislabelled photos
Run again with the same settings, it reuses the finished folds and resumes a cut one (--resume; its wall time
counts every piece, a killed one up to its last logged line). Folds run one after another; --parallel N runs N
at a time, which pays on a GPU (one small NiN run leaves it mostly idle).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nin
import predict
import split_data
import train

FOLDS = 5
SUSPECTS = 24  # photos in the suspect-label gallery and CSV
# train.py flags that cv.py sets for each fold itself.
MANAGED_FLAGS = ("--data-dir", "--out-dir", "--weights", "--class-idx", "--keep", "--resume")
Z95 = 1.959964  # the normal quantile of a two-sided 95 % interval


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """cv.py's own flags, and the train.py flags after `--` (checked by train.py's own parser)."""
    own, train_flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = nin.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                           usage="%(prog)s [options] [-- train.py flags]")
    p.add_argument("--folds", type=int, default=FOLDS, help="number of folds K (default: %(default)s)")
    p.add_argument("--source", type=Path, default=None,
                   help=f"folder of per-class image folders (default: {split_data.DEFAULT_SOURCE}, "
                        f"downloaded if missing)")
    p.add_argument("--out", type=Path, default=nin.RUNS_DIR / "cv", help="where the folds and tables go "
                                                                       "(default: %(default)s)")
    p.add_argument("--parallel", type=int, default=1, help="folds trained at a time (default: %(default)s)")
    p.add_argument("--split-seed", type=int, default=split_data.SEED,
                   help="split_data.py's --seed: changes which photos share a fold (default: %(default)s)")
    p.add_argument("--workers", type=int, default=nin.WORKERS,
                   help="threads that hash and decode the photos (default: %(default)s)")
    args = p.parse_args(own)
    if args.folds < 2:
        p.error("--folds must be at least 2")
    if args.parallel < 1 or args.workers < 1:
        p.error("--parallel and --workers must be at least 1")
    managed = [flag for flag in train_flags if flag.split("=")[0] in MANAGED_FLAGS]
    if managed:
        p.error(f"cv.py sets {', '.join(managed)} for each fold itself: leave it out of the train.py flags")
    train.parse_args(train_flags)  # a bad train.py flag is reported now, not after the first split
    return args, train_flags


# --------------------------------------------------------------------------------------------- one fold


def fold_dir(out: Path, fold: int) -> Path:
    return out / f"fold-{fold}"


def train_fold(folder: Path, flags: list[str], threads: int | None) -> tuple[bool, float]:
    """train.py on folder/data (resumed if a checkpoint is there); whether it succeeded, and its wall time."""
    resume = ["--resume"] if train.checkpoint_path(folder / "run").is_file() else []
    start = time.perf_counter()
    code = run_train(folder / "data", folder / "run", folder, ["--keep", "last", *resume, *flags], threads)
    return code == 0, time.perf_counter() - start


def run_train(data_dir: Path, out_dir: Path, folder: Path, flags: list[str], threads: int | None) -> int:
    """train.py in a process of its own (also bench/sweep.py's runs): data_dir's photos, its run files in
    out_dir, NiN.pth, class_idx.json and the log (log.txt, appended to) in folder; its exit code."""
    command = [sys.executable, str(nin.ROOT / "train.py"), "--data-dir", str(data_dir), "--out-dir", str(out_dir),
               "--weights", str(folder / "NiN.pth"), "--class-idx", str(folder / "class_idx.json"), *flags]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    with open(folder / "log.txt", "a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def whole_numbers(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]: an argparse type for comma-separated whole numbers (sweep.py's seeds,
    throughput.py's thread counts)."""
    try:
        numbers = [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated whole numbers: {text!r}") from None
    if min(numbers) < 0:
        raise argparse.ArgumentTypeError(f"not comma-separated whole numbers: {text!r} has a negative one")
    return numbers


def threads_per_run(parallel: int) -> int | None:
    """Torch threads for each of `parallel` runs sharing the machine's cores (None: one run, torch's default)."""
    return max((os.cpu_count() or 1) // parallel, 1) if parallel > 1 else None


def classified(weights: Path, paths: list[Path], workers: int, device: torch.device) -> tuple[list[str], list[dict]]:
    """The class names of the weights, and predict.py's result (probabilities, class maps) for each photo
    that can still be read (a warning for any other)."""
    saved = nin.load_weights(weights, device)
    return saved.classes, predict.run_batches(saved.model, paths, saved.image_size, device,
                                              batch_size=predict.BATCH_SIZE, workers=workers)


def finish_fold(folder: Path, fold: int, seconds: float, workers: int, device: torch.device) -> dict:
    """Score the fold's val photos with its last-epoch weights; write predictions.csv and result.json."""
    val = folder / "data" / "val"
    paths = nin.image_files(val)
    classes, results = classified(folder / "NiN.pth", paths, workers, device)
    if len(results) < len(paths):
        raise nin.CLIError(f"fold {fold}: a photo of the split could not be read again")
    rows = [{"photo": f"{r['path'].parent.name}/{r['path'].name}", "fold": fold, "label": r["path"].parent.name,
             **{f"p_{c}": f"{p:.6g}" for c, p in zip(classes, r["probs"].tolist(), strict=True)},
             "predicted": classes[int(r["probs"].argmax())]} for r in results]
    history = nin.load_csv(folder / "run" / "metrics.csv")
    validated = train.validated_epochs(history)
    best = train.best_validated(history)
    checkpoint = nin.load_torch(train.checkpoint_path(folder / "run"), "checkpoint")
    result = {"fold": fold, "photos": len(rows), "classes": classes,
              "last_correct": sum(r["predicted"] == r["label"] for r in rows),
              "last_acc_in_training": float(validated[-1]["val_acc"]), "epochs": len(history),
              "best_acc": float(best["val_acc"]), "best_epoch": int(best["epoch"]),
              "best_confusion": checkpoint["best_confusion"].tolist(), "train_seconds": round(seconds, 1)}
    nin.save_csv(rows, folder / "predictions.csv")
    nin.save_json(result, folder / "result.json")  # last: its presence means the fold is done
    shutil.rmtree(folder / "data", ignore_errors=True)  # the split and its decoding cache: made again if needed
    return result


def earlier_train_seconds(record: Path, log: Path) -> float:
    """Wall time of this fold's earlier, interrupted train.py runs. A run killed outright (kill -9, a closed
    session) could not add its own: it counts from its start to the last line it logged."""
    if not record.is_file():
        return 0.0
    earlier = json.loads(record.read_text())
    killed = max(0.0, log.stat().st_mtime - earlier["running_since"]) if earlier["running_since"] else 0.0
    return earlier["seconds"] + killed


def run_fold(fold: int, args: argparse.Namespace, flags: list[str], classes: dict[str, list[Path]],
             fractions: dict[Path, float | None], threads: int | None, device: torch.device) -> dict | None:
    """Split, train and score one fold (or read it if done); None if its training failed."""
    folder = fold_dir(args.out, fold)
    if (folder / "result.json").is_file():
        return json.loads((folder / "result.json").read_text())
    split_data.write_split(classes, split_data.sides_for(fractions, folds=args.folds, fold=fold), folder / "data")
    print(f"fold {fold}: training (log: {folder / 'log.txt'})", flush=True)
    record = folder / "train_time.json"  # wall time of the fold's train.py runs, kept across interruptions
    earlier = earlier_train_seconds(record, folder / "log.txt")
    nin.save_json({"seconds": earlier, "running_since": time.time()}, record)
    ok, seconds = train_fold(folder, flags, threads)
    nin.save_json({"seconds": earlier + seconds, "running_since": None}, record)
    if not ok:
        nin.warn(f"fold {fold}: train.py failed, see {folder / 'log.txt'}; run again to resume it")
        return None
    result = finish_fold(folder, fold, earlier + seconds, args.workers, device)
    print(f"fold {fold}: last epoch {result['last_correct'] / result['photos']:.2%}, best epoch "
          f"{result['best_acc']:.2%} (epoch {result['best_epoch']}), {result['train_seconds'] / 60:.1f} min",
          flush=True)
    return result


# --------------------------------------------------------------------------------------------- pooling


def wilson(correct: int, total: int) -> tuple[float, float]:
    """The 95 % Wilson score interval of a proportion (sound near 0 and 1, unlike the normal one)."""
    if total == 0:
        return 0.0, 1.0
    p, z2 = correct / total, Z95**2
    centre = (p + z2 / (2 * total)) / (1 + z2 / total)
    half = Z95 * math.sqrt(p * (1 - p) / total + z2 / (4 * total**2)) / (1 + z2 / total)
    return centre - half, centre + half


def accuracy_text(correct: int, total: int) -> str:
    low, high = wilson(correct, total)
    return f"{correct / total:.2%} ({correct:,}/{total:,}; 95 % interval {low:.1%}-{high:.1%})"


def recall_text(cm: torch.Tensor, classes: list[str]) -> str:
    return ", ".join(f"{c} {cm[i, i] / max(int(cm[i].sum()), 1):.1%} ({int(cm[i, i])}/{int(cm[i].sum())})"
                     for i, c in enumerate(classes))


def pooled_confusion(rows: list[dict], classes: list[str]) -> torch.Tensor:
    """The confusion matrix of the out-of-fold predictions (rows: the folders, columns: the predictions)."""
    index = {c: i for i, c in enumerate(classes)}
    return nin.confusion_matrix(torch.tensor([index[r["label"]] for r in rows]),
                                torch.tensor([index[r["predicted"]] for r in rows]), len(classes))


def report(results: list[dict], folds: int, rows: list[dict], calibration: dict, command: str) -> str:
    """cv.md: the per-fold table and the pooled figures."""
    classes = results[0]["classes"]
    last_cm = pooled_confusion(rows, classes)
    best_cm = sum(torch.tensor(r["best_confusion"]) for r in results)
    correct, total = int(last_cm.diag().sum()), len(rows)
    lines = [f"# Cross-validation, {folds} folds" + ("" if len(results) == folds else
                                                     f" ({len(results)} finished: the figures pool those)"), "",
             f"`{command}`", "",
             "| fold | val photos | last epoch | best epoch (epoch) | epochs | train.py wall time |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['fold']} | {r['photos']} | {r['last_correct'] / r['photos']:.2%} | {r['best_acc']:.2%} "
              f"({r['best_epoch']}) | {r['epochs']} | {r['train_seconds'] / 60:.1f} min |" for r in results]
    lines += ["", f"**Pooled out-of-fold accuracy, last epoch: {accuracy_text(correct, total)}**", "",
              f"Per-class recall, last epoch: {recall_text(last_cm, classes)}.", "",
              f"Best epoch of each fold, pooled: {accuracy_text(int(best_cm.diag().sum()), int(best_cm.sum()))}; "
              f"optimistic, as each fold's best epoch was chosen on the photos it is scored on. "
              f"Per-class recall: {recall_text(best_cm, classes)}.", "", calibration_text(calibration, len(rows))]
    return "\n".join(lines) + "\n"


def calibrate(rows: list[dict], classes: list[str]) -> dict:
    """How well the out-of-fold probabilities are calibrated by one temperature: fitted on all of them (what
    `predict.py --calibrate oof_predictions.csv` stores, measured on the photos it was fitted on), and, with
    two folds or more, cross-fitted: each fold's photos calibrated by the temperature and 'not sure' threshold
    fitted on the other folds' photos, which is how new photos would fare."""
    logits, labels = predict.oof_logits(rows, classes)
    temperature = nin.fit_temperature(logits, labels)
    result = {"temperature": temperature, "ece_raw": nin.expected_calibration_error(logits.softmax(1), labels),
              "ece_fitted": nin.expected_calibration_error((logits / temperature).softmax(1), labels)}
    folds = torch.tensor([int(r["fold"]) for r in rows])
    if len(folds.unique()) < 2:
        return result
    probs, thresholds = torch.empty_like(logits), torch.empty(len(rows), dtype=logits.dtype)
    temperatures = []
    for fold in folds.unique():
        mine, others = folds == fold, folds != fold
        temperatures.append(nin.fit_temperature(logits[others], labels[others]))
        probs[mine] = (logits[mine] / temperatures[-1]).softmax(1)
        thresholds[mine] = nin.not_sure_threshold((logits[others] / temperatures[-1]).softmax(1), labels[others])
    return {**result, "raw": logits.softmax(1), "labels": labels, "crossed_probs": probs,
            "fold_temperatures": (min(temperatures), max(temperatures)),
            "crossed": predict.calibration_summary(logits.softmax(1), probs, labels, thresholds)}


def calibration_text(calibration: dict, photos: int) -> str:
    text = (f"Calibration by one temperature, fitted on all these photos: {calibration['temperature']:.3f}; "
            f"expected calibration error ({nin.ECE_BINS} bins) {calibration['ece_raw']:.2%} raw, "
            f"{calibration['ece_fitted']:.2%} calibrated, measured on the photos it was fitted on.")
    if "crossed" not in calibration:
        return text
    crossed = calibration["crossed"]
    return (text + f" Each fold calibrated from the other folds: ECE {crossed['ece']:.2%} (a perfectly calibrated "
            f"model would read about {crossed['ece_if_calibrated']:.1%} on {photos:,} photos); with the 'not "
            f"sure' threshold fitted there too, {crossed['answered']:.1%} of the photos answered, "
            f"{crossed['answered_accuracy']:.2%} of them right.")


def save_figures(rows: list[dict], classes: list[str], calibration: dict, out: Path) -> list[str]:
    """oof_confusion.png, and with two folds or more oof_reliability.png (cross-fitted): pictures of the
    weights' quality that no photo they trained on flatters. Returns the names written."""
    cm = pooled_confusion(rows, classes)
    nin.save_confusion_matrix(cm, classes, out / "oof_confusion.png",
                              f"out of fold, last epoch: {int(cm.diag().sum()) / len(rows):.1%} of {len(rows):,}")
    if "crossed" not in calibration:
        return ["oof_confusion.png"]
    low, high = calibration["fold_temperatures"]
    predict.reliability_figure(calibration["raw"], calibration["crossed_probs"], calibration["labels"],
                               f"temperature of the other folds ({low:.2f}-{high:.2f})",
                               "'not sure' below the other folds' threshold", calibration["crossed"],
                               out / "oof_reliability.png")
    return ["oof_confusion.png", "oof_reliability.png"]


def suspects(rows: list[dict]) -> list[dict]:
    """The photos whose out-of-fold prediction disagrees with their folder, most confident first."""
    wrong = [r for r in rows if r["predicted"] != r["label"]]
    wrong.sort(key=lambda r: -float(r[f"p_{r['predicted']}"]))
    return [{"photo": r["photo"], "folder": r["label"], "predicted": r["predicted"],
             "probability": round(float(r[f"p_{r['predicted']}"]), 4), "fold": r["fold"]} for r in wrong[:SUSPECTS]]


def suspect_gallery(chosen: list[dict], out: Path, source: Path, workers: int, device: torch.device) -> bool:
    """The suspects as thumbnails with their predicted class's map, each scored again by its own fold's model.
    A fold whose weights are gone (deleted for space, or its predictions carried to another machine) is left out
    of the picture with a warning: the pooled figures need only its predictions. False if nothing was drawn."""
    suspect_of = {source / s["photo"]: s for s in chosen}
    results, classes = [], []
    for fold in sorted({s["fold"] for s in chosen}):
        weights = fold_dir(out, fold) / "NiN.pth"
        if not weights.is_file():
            nin.warn(f"fold {fold}'s weights are gone ({weights}): its suspects are in suspect_labels.csv, "
                     f"not drawn")
            continue
        paths = [path for path, s in suspect_of.items() if s["fold"] == fold]
        classes, scored = classified(weights, paths, workers, device)
        results += [{**r, "suspect": suspect_of[r["path"]]} for r in scored]
    if not results:
        return False
    results.sort(key=lambda r: chosen.index(r["suspect"]))
    titles = [f"{r['suspect']['photo']}\nfolder {r['suspect']['folder']}, model says\n"
              f"{r['suspect']['predicted']} {r['suspect']['probability']:.0%}" for r in results]
    nin.save_figure(predict.grid_figure(results, classes, heatmap=True, titles=titles), out / "suspect_labels.png")
    return True


# --------------------------------------------------------------------------------------------- main


def check_folds_hold_photos(fractions: dict[Path, float | None], folds: int) -> None:
    """Refuse, before any training, folds that would have no photo to score (a small folder, many folds)."""
    held = {split_data.fold_of(f, folds) for f in fractions.values() if f is not None}
    empty = [str(fold) for fold in range(folds) if fold not in held]
    if empty:
        raise nin.CLIError(f"fold(s) {', '.join(empty)} of {folds} would hold no photo: use fewer --folds")


def check_settings(out: Path, settings: dict) -> None:
    """The folds of one --out must come from one recipe: refuse to mix in another (before any work)."""
    path = out / "cv.json"
    if path.is_file() and (before := json.loads(path.read_text())) != settings:
        raise nin.CLIError(f"{out} holds a cross-validation with other settings ({before}): "
                           f"use another --out, or delete it to start again")


def check_folders(out: Path, source: Path, folds: int) -> None:
    """Refuse, before any work, an --out inside the source (a second run would take it for a class) and a source
    inside one of the fold folders this run writes (a fold's data/ is replaced by its split)."""
    split_data.check_outside(out, source)
    if any(source.resolve().is_relative_to(fold_dir(out, k).resolve()) for k in range(folds)):
        raise nin.CLIError(f"the source folder {source} is inside a fold folder of --out {out}, which this run "
                           f"writes: copy its photos elsewhere first")


def main() -> None:
    args, flags = parse_args(sys.argv[1:])
    source = args.source or split_data.DEFAULT_SOURCE
    check_folders(args.out, source, args.folds)
    if args.source is None and not source.is_dir():
        split_data.fetch_flower_photos(source, None)
    settings = {"folds": args.folds, "split_seed": args.split_seed, "source": str(source.resolve()),
                "train_flags": flags}
    check_settings(args.out, settings)
    classes = split_data.list_classes(source)
    fractions = split_data.val_fractions([f for files in classes.values() for f in files], args.split_seed,
                                         args.workers)
    split_data.check_readable(classes, fractions)
    check_folds_hold_photos(fractions, args.folds)
    nin.save_json(settings, args.out / "cv.json")  # only now: a mistyped --source leaves --out unclaimed
    device = nin.pick_device(None)
    threads = threads_per_run(args.parallel)
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda fold: run_fold(fold, args, flags, classes, fractions, threads, device),
                                range(args.folds)))
    done = [r for r in results if r is not None]
    if not done:
        raise nin.CLIError("no fold finished")
    rows = sorted((row for r in done for row in nin.load_csv(fold_dir(args.out, r["fold"]) / "predictions.csv")),
                  key=lambda row: row["photo"])
    nin.save_csv(rows, args.out / "oof_predictions.csv")
    command = shlex.join(["python", "bench/cv.py", *sys.argv[1:]])
    class_names = done[0]["classes"]
    calibration = calibrate(rows, class_names)
    table = report(done, args.folds, rows, calibration, command)
    nin.atomic_write(args.out / "cv.md", lambda f: f.write(table), mode="w")
    figures = save_figures(rows, class_names, calibration, args.out)
    nin.save_csv([{k: v for k, v in r.items() if k not in ("classes", "best_confusion")} for r in done],
             args.out / "folds.csv")
    chosen, drawn = suspects(rows), False
    if chosen:
        nin.save_csv(chosen, args.out / "suspect_labels.csv")
        drawn = suspect_gallery(chosen, args.out, source, args.workers, device)
    print(table)
    print(f"wrote {args.out}: cv.md, folds.csv, oof_predictions.csv, {', '.join(figures)}" +
          (", suspect_labels.csv" if chosen else "") + (" and .png" if drawn else ""))
    if len(done) < args.folds:
        raise nin.CLIError(f"{args.folds - len(done)} fold(s) failed: run the same command again to resume them")


if __name__ == "__main__":
    nin.run_cli(main)
