"""Classify images with trained NiN weights, or evaluate them on a labelled folder.

    python predict.py test_img/tulip.jpg                 # top-k, and the photo beside a bar chart
    python predict.py test_img/tulip.jpg --heatmap       # ... and where the network saw the class
    python predict.py photos/ --top-k 5 --json           # folders are searched; JSON for other programs
    python predict.py test_img/*.jpg --save preds.png    # a grid of thumbnails, saved instead of shown
    python predict.py --eval data/val                    # accuracy, per-class scores, confusion matrix, calibration
    python predict.py --calibrate data/val               # fit probabilities and 'not sure' on held-out photos

Figures are shown where there is a display, else only saved (--save). Several images also give a CSV with one row
per image (--json prints every result instead, and draws no figure of them), and --eval its confusion matrix, its
CSV and a gallery of the most confident mistakes, all in --out-dir. Probabilities are calibrated (a temperature
fitted on held-out photos by --calibrate and stored in the weights); an answer whose top probability is below the
stored threshold reads "not sure (best guess: ...)". NiN.pth lists the photos it trained on (by content): a warning
says when some of the images are among them, and --calibrate refuses them.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

import nin

if TYPE_CHECKING:  # matplotlib is imported only where a figure is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

TOP_K = 3
OUT_DIR = nin.RUNS_DIR / "predict"
BATCH_SIZE = 64
GRID_MAX = 48  # thumbnails in a figure of several images; the CSV has them all
MISTAKES_SHOWN = 12
FILE_ONLY_BACKENDS = {"agg", "cairo", "pdf", "pgf", "ps", "svg", "template"}


def parse_args() -> argparse.Namespace:
    p = nin.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="*", type=Path, help="image files or folders of images")
    p.add_argument("--eval", type=Path, default=None, metavar="DIR",
                   help="evaluate on a labelled folder (DIR/<class>/<image>), e.g. data/val")
    p.add_argument("--calibrate", type=Path, default=None, metavar="SOURCE",
                   help="fit the temperature and the 'not sure' threshold of --weights on held-out photos, and "
                        "store them there: a labelled folder (DIR/<class>/<image>) or bench/cv.py's "
                        "oof_predictions.csv")
    p.add_argument("--weights", type=Path, default=nin.WEIGHTS_PATH, help="trained weights (default: %(default)s)")
    p.add_argument("--class-idx", type=Path, default=nin.CLASS_IDX_PATH,
                   help="class map written by train.py (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=None, help=f"classes listed per image (default: {TOP_K})")
    p.add_argument("--heatmap", action="store_true",
                   help="overlay the predicted class's map (the one its logit is the mean of) on the photos")
    p.add_argument("--not-sure", type=float, default=None, metavar="P",
                   help="answer 'not sure (best guess: ...)' when the top probability is below P (default: the "
                        "threshold stored by --calibrate; 0: always answer)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average the predictions of each image and its mirror image")
    p.add_argument("--json", action="store_true",
                   help="print the results as JSON, and draw no figure of the images (--eval still writes its "
                        "figures into --out-dir)")
    p.add_argument("--save", type=Path, default=None, metavar="FILE",
                   help="save the figure (PNG, PDF, ...) instead of showing it")
    p.add_argument("--out-dir", type=Path, default=None,
                   help=f"where the CSV of several images (without --json) and --eval's files go (default: {OUT_DIR})")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                   help="images per forward pass (default: %(default)s)")
    p.add_argument("--workers", type=int, default=nin.WORKERS, help="decoding threads (default: %(default)s)")
    p.add_argument("--device", default=None, help="cuda, mps, cpu (default: cuda, else mps, else cpu)")
    args = p.parse_args()
    if sum(map(bool, (args.images, args.eval, args.calibrate))) != 1:
        p.error("give one of: image files or folders, --eval DIR, --calibrate SOURCE")
    if args.images and args.json and (args.save or args.heatmap):
        p.error("--json draws no figure of the images: not with --save or --heatmap")
    if args.save and not args.images:
        p.error("--save names the figure of the images; --eval writes its figures into --out-dir")
    if args.calibrate and args.not_sure is not None:
        p.error("--calibrate fits the 'not sure' threshold itself: not with --not-sure")
    # The temperature serves plain predictions; and --calibrate lists no classes and writes no CSV or figure.
    if args.calibrate and (args.json or args.heatmap or args.tta or args.top_k is not None or args.out_dir is not None):
        p.error("--calibrate prints its fit and stores it in --weights: not with --json, --heatmap, --tta, --top-k "
                "or --out-dir")
    args.top_k = TOP_K if args.top_k is None else args.top_k  # None until here: given, or left at the default
    args.out_dir = OUT_DIR if args.out_dir is None else args.out_dir
    if args.not_sure is not None and not 0 <= args.not_sure < 1:
        p.error("--not-sure must be in [0, 1)")
    for flag, value in (("--top-k", args.top_k), ("--batch-size", args.batch_size), ("--workers", args.workers)):
        if value < 1:
            p.error(f"{flag} must be at least 1")
    if args.images and not args.json:  # a figure of the images is drawn, and may be shown: matplotlib is imported
        formats = figure_formats()  # now, so that a bad MPLBACKEND or --save format is one line before any work
        if args.save is not None and args.save.suffix.lower().lstrip(".") not in formats:
            p.error(f"--save {args.save}: not a figure format matplotlib writes ({', '.join(sorted(formats))})")
    return args


# --------------------------------------------------------------------------------------------- inputs


def figure_formats() -> set[str]:
    """The file suffixes matplotlib can save a figure as (png, pdf, svg, ...). Importing it here also turns an
    invalid MPLBACKEND into a one-line error before any work."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except (ValueError, ImportError) as error:
        raise nin.CLIError(f"matplotlib cannot start: {nin.first_line(error)}") from None
    return set(FigureCanvasBase.get_supported_filetypes())


def check_outputs(args: argparse.Namespace, images: list[Path]) -> None:
    """What this run will write can be written: checked before any image is read."""
    if args.save is not None:
        nin.check_output_file(args.save, "--save")
    if args.calibrate is not None:
        nin.check_output_file(args.weights, "--weights")
    if args.eval or (len(images) > 1 and not args.json):  # where --eval's files, or predictions.csv, may go
        nin.check_output_folder(args.out_dir, "--out-dir")


def expand(paths: list[Path]) -> list[Path]:
    """Files as given; folders replaced by the images inside them, sorted."""
    files = []
    for path in paths:
        if path.is_dir():
            found = nin.image_files(path)  # special files among them: skipped with a warning when decoded
            if not found:
                nin.warn(f"no images in folder {path}")
            files += found
        elif path.exists():
            files.append(path)
        else:
            raise nin.CLIError(f"image not found: {path}")
    return files


def labelled_images(folder: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """Images of folder/<class>/ with the weights' index of their class; unknown classes are reported."""
    if not folder.is_dir():
        raise nin.CLIError(f"evaluation folder not found: {folder}")
    paths, labels = [], []
    for sub in sorted(d for d in folder.iterdir() if d.is_dir() and not nin.is_hidden(d.name)):
        found = nin.image_files(sub)
        if sub.name not in classes:
            nin.warn(f"class folder {sub.name!r} ({len(found)} images) is not a class of the weights: not scored")
        elif found:
            paths += found
            labels += [classes.index(sub.name)] * len(found)
    missing = sorted(set(classes) - {classes[i] for i in labels})
    if missing:
        nin.warn(f"no images for the classes {', '.join(missing)} in {folder}")
    if not paths:
        raise nin.CLIError(f"{folder} has no images in folders named after the classes {classes}")
    return paths, labels


def load_model(weights: Path, class_idx: Path, device: torch.device) -> nin.SavedWeights:
    """The weights and all they hold, once class_idx.json is checked to name the same classes in the same order."""
    saved = nin.load_weights(weights, device)
    names = nin.load_class_names(class_idx)
    if names != saved.classes:
        raise nin.CLIError(f"{class_idx} does not match {weights}: it lists {nin.few(names)}, the weights were "
                           f"trained on {nin.few(saved.classes)}")
    return saved


def photos_it_trained_on(trained_on: torch.Tensor | None, paths: list[Path], workers: int) -> int:
    """How many of these photos trained the weights: NiN.pth lists its training photos by content, so a copy
    under another name or in another split counts too (0 for weights from before it kept that list)."""
    if trained_on is None or not paths:
        return 0
    return int(torch.isin(nin.fingerprints(paths, workers), trained_on).sum())


# --------------------------------------------------------------------------------------------- inference


@torch.no_grad()
def classify(model: nin.NiN, images: torch.Tensor, tta: bool = False, temperature: float = 1.0,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities [N, C] and class maps [N, C, h, w] for uint8 images [N, 3, H, W].

    The logits are the means of the class maps (global average pooling), so each map shows where the
    network found its class; divided by the calibrated temperature, their softmax is the probabilities.
    With tta the mirror image's maps, mirrored back, are averaged in.
    """
    x = nin.normalize(images)
    maps = model.class_maps(x)
    if tta:
        maps = (maps + model.class_maps(x.flip(-1)).flip(-1)) / 2
    return (maps.mean((2, 3)) / temperature).softmax(1), maps


def run_batches(model: nin.NiN, paths: list[Path], image_size: int, device: torch.device, *, batch_size: int,
                workers: int, tta: bool = False, temperature: float = 1.0) -> list[dict]:
    """Decode and classify in batches, with one progress bar; unreadable files are skipped with a warning."""
    from tqdm import tqdm

    results = []
    bar = tqdm(total=len(paths), desc="classify", unit="img", disable=True if len(paths) <= batch_size else None)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        decoded = nin.decode_images(chunk, nin.eval_tensor, image_size, workers, "decode", progress=False)
        kept = [(p, img) for p, img in zip(chunk, decoded, strict=True) if img is not None]
        if kept:
            images = torch.stack([img for _, img in kept]).to(device)
            probs, maps = classify(model, images, tta, temperature)
            for (path, image), p, m in zip(kept, probs.cpu(), maps.float().cpu(), strict=True):
                results.append({"path": path, "image": image, "probs": p, "map": m})
        bar.update(len(chunk))
    bar.close()
    if not results:
        raise nin.CLIError(f"cannot read image {paths[0]}" if len(paths) == 1 else "no image could be read")
    return results


def score_labelled(model: nin.NiN, paths: list[Path], labels: list[int], image_size: int, args: argparse.Namespace,
                   device: torch.device, temperature: float = 1.0) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
    """run_batches on labelled photos, plus the logits (before the temperature) and labels of those it could read."""
    label_of = dict(zip(paths, labels, strict=True))
    results = run_batches(model, paths, image_size, device, batch_size=args.batch_size, workers=args.workers,
                          tta=args.tta, temperature=temperature)
    return (results, torch.stack([r["map"].mean((1, 2)) for r in results]),
            torch.tensor([label_of[r["path"]] for r in results]))


def answer(probs: torch.Tensor, classes: list[str], k: int, not_sure_below: float) -> str:
    """The top-k classes as text, prefixed "not sure (best guess: ...)" below the threshold."""
    ranked = ", ".join(f"{t['class']} {t['probability']:.1%}" for t in top_k(probs, classes, k))
    return f"not sure (best guess: {ranked})" if unsure(probs, not_sure_below) else ranked


def unsure(probs: torch.Tensor, not_sure_below: float) -> bool:
    return float(probs.max()) < not_sure_below


def top_k(probs: torch.Tensor, classes: list[str], k: int) -> list[dict]:
    values, indices = probs.topk(min(k, len(classes)))
    return [{"class": classes[i], "probability": round(v, 4)}
            for v, i in zip(values.tolist(), indices.tolist(), strict=True)]


# --------------------------------------------------------------------------------------------- figures


def shown_name(path: Path) -> str:
    """A file name a figure can draw: bytes that are not UTF-8 are written as escapes."""
    return path.name.encode("utf-8", "backslashreplace").decode("utf-8")


def overlay(ax: Axes, result: dict, heatmap: bool, label: int) -> None:
    """The photo, and if asked the class map of `label`, upsampled, as a translucent heat map on top."""
    image = result["image"]
    ax.imshow(image.permute(1, 2, 0).numpy())
    if heatmap:
        low_res = result["map"][label]
        cam = F.interpolate(low_res[None, None], size=image.shape[1:], mode="bilinear", align_corners=False)[0, 0]
        # The colour scale of the map itself: a flat map (a small image) stays flat instead of its rounding noise
        # being stretched over the whole scale.
        low = float(low_res.min())
        ax.imshow(cam.numpy(), cmap="jet", alpha=0.45, vmin=low, vmax=max(float(low_res.max()), low + 1e-3))
    ax.axis("off")


def single_figure(result: dict, classes: list[str], k: int, heatmap: bool, not_sure_below: float) -> Figure:
    """One photo beside a horizontal bar chart of its top-k probabilities."""
    import matplotlib.pyplot as plt

    top = top_k(result["probs"], classes, k)
    doubt = "not sure, best guess: " if unsure(result["probs"], not_sure_below) else ""
    fig, (image_ax, bar_ax) = plt.subplots(1, 2, figsize=(9, 3.8), gridspec_kw={"width_ratios": [1, 1.2]})
    overlay(image_ax, result, heatmap, classes.index(top[0]["class"]))
    image_ax.set_title(f"{shown_name(result['path'])}: {doubt}{top[0]['class']} {top[0]['probability']:.0%}"
                       + (" (heat map of that class)" if heatmap else ""), fontsize=9)
    names = [t["class"] for t in top][::-1]
    values = [t["probability"] for t in top][::-1]
    bars = bar_ax.barh(names, values, color=["tab:gray"] * (len(top) - 1) + ["tab:green"])
    bar_ax.bar_label(bars, [f"{v:.1%}" for v in values], padding=3)
    bar_ax.set_xlim(0, 1.15)
    bar_ax.set_xlabel("probability")
    bar_ax.set_title(f"top {len(top)}")
    fig.tight_layout()
    return fig


def grid_figure(results: list[dict], classes: list[str], heatmap: bool, titles: list[str] | None = None,
                not_sure_below: float = 0.0) -> Figure:
    """Thumbnails with their predicted class and probability (or the given titles)."""
    import matplotlib.pyplot as plt

    shown = results[:GRID_MAX]
    cols = min(len(shown), 6)
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.8 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, result) in enumerate(zip(axes.flat, shown, strict=False)):
        best = int(result["probs"].argmax())
        overlay(ax, result, heatmap, best)
        doubt = "not sure: " if unsure(result["probs"], not_sure_below) else ""
        title = titles[i] if titles else \
            f"{shown_name(result['path'])}\n{doubt}{classes[best]} {result['probs'][best]:.0%}"
        ax.set_title(title, fontsize=8)
    if len(results) > GRID_MAX:
        fig.suptitle(f"first {GRID_MAX} of {len(results)} images (all are in the CSV)", fontsize=9)
    return fig


def show_or_save(fig: Figure, save: Path | None) -> None:
    import matplotlib.pyplot as plt  # matplotlib falls back to a file-only backend when there is no display

    if save is not None:
        nin.save_figure(fig, save)
        print(f"saved {save}")
    elif plt.get_backend().lower() in FILE_ONLY_BACKENDS:
        plt.close(fig)
        print("no display to show the figure on: use --save FILE to keep it")
    else:
        plt.show()


# --------------------------------------------------------------------------------------------- modes


def predict_images(saved: nin.SavedWeights, paths: list[Path], args: argparse.Namespace, device: torch.device) -> None:
    classes, threshold = saved.classes, saved.calibration.not_sure_below
    if seen := photos_it_trained_on(saved.trained_on, paths, args.workers):
        nin.warn(f"{paths[0]} is a photo {args.weights} trained on: its answer says little about new photos"
                 if len(paths) == 1 else f"{seen} of these {len(paths)} images are photos {args.weights} trained on: "
                 f"its answers for them say little about new photos")
    results = run_batches(saved.model, paths, saved.image_size, device, batch_size=args.batch_size,
                          workers=args.workers, tta=args.tta, temperature=saved.calibration.temperature)
    if args.json:
        print(json.dumps([{"image": str(r["path"]), "top": top_k(r["probs"], classes, args.top_k),
                           "not_sure": unsure(r["probs"], threshold)} for r in results], indent=2))
        return
    for r in results:
        print(f"{r['path']}: {answer(r['probs'], classes, args.top_k, threshold)}")
    if len(results) > 1:
        rows = [{"image": str(r["path"]), **{c: round(float(p), 4) for c, p in zip(classes, r["probs"], strict=True)},
                 "predicted": classes[int(r["probs"].argmax())], "not_sure": int(unsure(r["probs"], threshold))}
                for r in results]
        nin.save_csv(rows, args.out_dir / "predictions.csv")
        print(f"wrote {args.out_dir / 'predictions.csv'}")
    fig = (single_figure(results[0], classes, args.top_k, args.heatmap, threshold) if len(results) == 1
           else grid_figure(results, classes, args.heatmap, not_sure_below=threshold))
    show_or_save(fig, args.save)


def evaluate_folder(saved: nin.SavedWeights, args: argparse.Namespace, device: torch.device) -> None:
    classes, calibration = saved.classes, saved.calibration
    paths, labels = labelled_images(args.eval, classes)
    if seen := photos_it_trained_on(saved.trained_on, paths, args.workers):
        nin.warn(f"{seen} of the {len(paths)} photos of {args.eval} trained {args.weights}: the scores below read "
                 f"high (held-out photos, or bench/cv.py, give ones that hold for new photos)")
    results, logits, targets = score_labelled(saved.model, paths, labels, saved.image_size, args, device,
                                              calibration.temperature)
    probs = torch.stack([r["probs"] for r in results])
    raw = logits.softmax(1)  # without the temperature
    threshold = calibration.not_sure_below
    reliability = calibration_summary(raw, probs, targets, threshold)
    k = min(args.top_k, len(classes))
    top1 = probs.argmax(1)
    topk_hit = (probs.topk(k).indices == targets[:, None]).any(1)
    cm = nin.confusion_matrix(targets, top1, len(classes))
    rows = [{"image": str(r["path"]), "true": classes[t], "predicted": classes[p],
             "probability": round(float(q[p]), 4), "correct": int(t == p), "not_sure": int(unsure(q, threshold))}
            for r, t, p, q in zip(results, targets.tolist(), top1.tolist(), probs, strict=True)]
    mistakes = sorted((i for i, row in enumerate(rows) if not row["correct"]), key=lambda i: -rows[i]["probability"])
    shown = mistakes[:MISTAKES_SHOWN]
    truth = {i: f"true {rows[i]['true']}" + ("; not sure" if rows[i]["not_sure"] else "") for i in shown}
    summary = {"images": len(results), "top1": round(float((top1 == targets).float().mean()), 4),
               f"top{k}": round(float(topk_hit.float().mean()), 4), **reliability}
    if args.json:
        print(json.dumps({**summary, "confusion_matrix": cm.tolist(), "classes": classes,
                          "mistakes": [rows[i] for i in shown]}, indent=2))
    else:
        images = "1 image" if len(results) == 1 else f"{len(results)} images"
        print(f"{images} of {args.eval}: top-1 accuracy {summary['top1']:.2%}, "
              f"top-{k} {summary[f'top{k}']:.2%}" + (" (flip TTA)" if args.tta else ""))
        print(f"calibration ({calibration.fitted_on}): temperature {calibration.temperature:.3f}, "
              + ece_line(reliability, len(results)))
        print(f"'not sure' below {threshold:.0%}: {reliability['answered']:.1%} of the photos answered, "
              f"{reliability['answered_accuracy']:.2%} of them right")
        print(nin.classification_report(cm, classes))
        width = max(len(c) for c in classes)
        print("\nconfusion matrix (rows: true, columns: predicted)")
        print(" " * width + "".join(f"{c[:7]:>8}" for c in classes))
        for c, row in zip(classes, cm.tolist(), strict=True):
            print(f"{c:<{width}}" + "".join(f"{n:>8}" for n in row))
        print(f"\nmost confident mistakes ({len(mistakes)} in all):")
        for i in shown:
            print(f"  {rows[i]['probability']:.1%} {rows[i]['predicted']:<{width}} ({truth[i]}): {rows[i]['image']}")
    out = args.out_dir
    nin.save_csv(rows, out / "eval_predictions.csv")
    nin.save_confusion_matrix(cm, classes, out / "eval_confusion.png", f"{args.eval}: top-1 {summary['top1']:.1%}")
    reliability_figure(raw, probs, targets, f"temperature {calibration.temperature:.2f}",
                       f"'not sure' below {threshold:.0%}", reliability, out / "eval_reliability.png")
    written = [out / "eval_predictions.csv", out / "eval_confusion.png", out / "eval_reliability.png"]
    if mistakes:
        gallery = [results[i] for i in shown]
        titles = [f"{rows[i]['predicted']} {rows[i]['probability']:.0%}\n({truth[i]})" for i in shown]
        nin.save_figure(grid_figure(gallery, classes, args.heatmap, titles), out / "eval_mistakes.png")
        written.append(out / "eval_mistakes.png")
    if not args.json:
        print("wrote " + ", ".join(map(str, written)))


def calibration_summary(raw: torch.Tensor, probs: torch.Tensor, targets: torch.Tensor,
                        threshold: float | torch.Tensor) -> dict[str, float]:
    """Expected calibration error before and after the temperature, and what the 'not sure' threshold (one, or
    one per photo) keeps."""
    answered = probs.max(1).values >= threshold
    right = probs.argmax(1) == targets
    return {"ece_raw": round(nin.expected_calibration_error(raw, targets), 4),
            "ece": round(nin.expected_calibration_error(probs, targets), 4),
            "ece_if_calibrated": round(nin.ece_of_a_calibrated_model(probs), 4),
            "answered": round(float(answered.float().mean()), 4),
            "answered_accuracy": round(float(right[answered].float().mean()) if answered.any() else 0.0, 4)}


def ece_line(summary: dict[str, float], photos: int) -> str:
    return (f"expected calibration error {summary['ece_raw']:.2%} raw, {summary['ece']:.2%} calibrated "
            f"(a perfectly calibrated model would read about {summary['ece_if_calibrated']:.1%} on {photos} photos)")


def reliability_figure(raw: torch.Tensor, probs: torch.Tensor, targets: torch.Tensor, calibrated: str,
                       not_sure: str, summary: dict[str, float], path: Path) -> None:
    """Left: accuracy against confidence in the ECE's bins, raw and calibrated, beside the diagonal a calibrated
    model follows (dot area: the share of photos in the bin). Right: what each 'not sure' threshold would give,
    the share of photos answered against the accuracy of those answers (a risk-coverage curve), the chosen one
    marked.
    `calibrated` and `not_sure` name the calibration and the threshold; `summary` is calibration_summary's,
    for the figures the plot names."""
    plt = nin.pyplot_for_files()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.8))
    left.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    for name, p, ece, colour in (("raw softmax", raw, summary["ece_raw"], "tab:orange"),
                                 (calibrated, probs, summary["ece"], "tab:blue")):
        confidence, predicted = p.max(1)
        which = nin.confidence_bin(confidence)
        points = [(confidence[which == b].mean().item(), (predicted == targets)[which == b].float().mean().item(),
                   int((which == b).sum())) for b in range(nin.ECE_BINS) if (which == b).any()]
        left.plot([x for x, _, _ in points], [y for _, y, _ in points], "o-", color=colour,
                  label=f"{name}: ECE {ece:.1%}")
        left.scatter([x for x, _, _ in points], [y for _, y, _ in points],
                     s=[4 + 400 * n / len(targets) for _, _, n in points], color=colour, alpha=0.3)
    left.set(xlabel="top probability (binned)", ylabel="accuracy in the bin", xlim=(0, 1), ylim=(0, 1.02))
    left.set_title(f"reliability, {len(targets)} photos (a perfectly calibrated model\nwould read ECE "
                   f"{summary['ece_if_calibrated']:.1%} on so few)", fontsize=10)
    left.legend(loc="upper left", fontsize=8)

    confidence, predicted = probs.max(1)
    order = confidence.argsort(descending=True)
    answered = torch.arange(1, len(order) + 1) / len(order)
    accuracy = (predicted == targets)[order].float().cumsum(0) / torch.arange(1, len(order) + 1)
    right.plot(answered, accuracy, color="tab:blue")
    if summary["answered"] > 0:
        right.plot(summary["answered"], summary["answered_accuracy"], "o", color="tab:red",
                   label=not_sure)
        right.legend(loc="lower left", fontsize=8)
    right.set(xlabel="share of photos answered (the rest: 'not sure')", ylabel="accuracy of the answered photos",
              xlim=(0, 1.02))
    right.set_title("what a 'not sure' threshold trades", fontsize=10)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    nin.save_figure(fig, path)


def held_out_logits(source: Path, saved: nin.SavedWeights, args: argparse.Namespace,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of held-out photos: scored here from a labelled folder, or read from bench/cv.py's
    oof_predictions.csv (its log-probabilities: the softmax of log p is p, whatever the logits were)."""
    if source.is_dir():
        paths, labels = labelled_images(source, saved.classes)
        if seen := photos_it_trained_on(saved.trained_on, paths, args.workers):
            raise nin.CLIError(f"{seen} of the {len(paths)} photos of {source} trained {args.weights}: a temperature "
                               f"fitted on them would be wrong; give photos it never saw, or bench/cv.py's "
                               f"oof_predictions.csv")
        _, logits, targets = score_labelled(saved.model, paths, labels, saved.image_size, args, device)
        return logits, targets
    if not source.is_file():
        raise nin.CLIError(f"--calibrate {source}: no such folder or file")
    try:
        return oof_logits(nin.load_csv(source), saved.classes)
    except (ValueError, csv.Error) as error:
        raise nin.CLIError(f"{source}: {error}") from None


def oof_logits(rows: list[dict[str, str]], classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of the rows of an oof_predictions.csv (ValueError if they are not one for `classes`)."""
    columns = [f"p_{c}" for c in classes]
    if not rows or not set(columns) <= set(rows[0]) or "label" not in rows[0]:
        raise ValueError(f"not an oof_predictions.csv for the classes {nin.few(classes)}")
    for line, row in enumerate(rows, start=2):
        if None in row.values() or row["label"] not in classes:
            raise ValueError(f"line {line}: too few columns, or a label that is not one of {nin.few(classes)}")
    def number(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            return math.nan  # reported with its line below, as any other value outside [0, 1]

    probs = torch.tensor([[number(r[c]) for c in columns] for r in rows], dtype=torch.float64)
    outside = ~((probs >= 0) & (probs <= 1)).all(1)  # nan and inf too: a temperature fitted on them would be nan
    if outside.any():
        raise ValueError(f"line {int(outside.nonzero()[0]) + 2}: a probability that is not a number from 0 to 1")
    labels = torch.tensor([classes.index(r["label"]) for r in rows])
    return probs.clamp(min=1e-45).log(), labels  # 0 where float32 underflowed


def calibrate_weights(saved: nin.SavedWeights, args: argparse.Namespace, device: torch.device) -> None:
    """--calibrate: fit, report, and store the temperature and the 'not sure' threshold in --weights."""
    logits, labels = held_out_logits(args.calibrate, saved, args, device)
    temperature = nin.fit_temperature(logits, labels)
    raw, probs = logits.softmax(1), (logits / temperature).softmax(1)
    threshold = nin.not_sure_threshold(probs, labels)
    summary = calibration_summary(raw, probs, labels, threshold)
    calibration = nin.Calibration(temperature, round(threshold, 4), f"{len(labels)} photos of {args.calibrate}")
    stored = nin.load_torch(args.weights, "weights")  # as it is on disk: float16 weights stay float16
    stored["calibration"] = dataclasses.asdict(calibration)
    nin.save_torch(stored, args.weights)
    print(f"fitted on {len(labels)} photos of {args.calibrate}: temperature {temperature:.3f}; "
          f"on these same photos, {ece_line(summary, len(labels))}")
    print(f"'not sure' below {threshold:.1%} (keeps {nin.NOT_SURE_KEEP:.0%} of the photos answered right): "
          f"{summary['answered']:.1%} of these photos answered, {summary['answered_accuracy']:.2%} of them right")
    print(f"stored in {args.weights}")


def main() -> None:
    args = parse_args()
    images = expand(args.images)  # none with --eval or --calibrate
    check_outputs(args, images)
    device = nin.pick_device(args.device)
    saved = load_model(args.weights, args.class_idx, device)
    if args.not_sure is not None:  # the flag wins over the threshold stored with the weights
        saved.calibration = dataclasses.replace(saved.calibration, not_sure_below=args.not_sure)
    if args.calibrate:
        calibrate_weights(saved, args, device)
    elif args.eval:
        evaluate_folder(saved, args, device)
    else:
        predict_images(saved, images, args, device)


if __name__ == "__main__":
    nin.run_cli(main)
