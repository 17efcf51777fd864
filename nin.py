"""NiN (Network in Network, Lin, Chen & Yan 2014): the model, and what train.py and predict.py share.

An mlpconv block is a k x k convolution followed by two 1 x 1 convolutions: a tiny MLP slid over every
position. The last block emits one feature map per class and global average pooling turns each map into a
logit, so the network has no fully connected layer at all.

Read in this order: the model (NiN), then the contract between train.py and predict.py (how a photo becomes
the network's input, and the formats of NiN.pth and class_idx.json), then the reports both print. The
plumbing at the end (paths, one-line errors, safe file writes) can be skipped on a first reading.

`python nin.py` prints every layer's output shape and the parameter count.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import glob
import hashlib
import inspect
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from PIL import Image, ImageOps
from torch import nn
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

if TYPE_CHECKING:  # matplotlib is imported only where a figure is drawn
    from matplotlib.figure import Figure

IMAGE_SIZE = 160  # the side of the square the network sees (train.py --image-size, predict.py reads it from NiN.pth)
# Width inside the last mlpconv block (0: num_classes, the usual narrow layout; the paper's ImageNet net: 1024).
HEAD_WIDTH = 512
MAX_HEAD_WIDTH = 4096  # 8 times the default: beyond it the last block alone would need gigabytes
# The smallest input for which the three 3x3/2 poolings still leave one pixel, and a largest one that a
# photo classifier has any use for (memory grows with its square).
MIN_IMAGE_SIZE = 63
MAX_IMAGE_SIZE = 1024
# The umask can only be read by setting it and putting it back: done once here, at import, because doing it
# in atomic_write would leave a window in which another thread's new files get the umask 0.
UMASK = os.umask(0o022)
os.umask(UMASK)


# --------------------------------------------------------------------------------------------------- the model


def mlpconv(in_ch: int, width: int, kernel: int, stride: int, padding: int, batch_norm: bool,
            out_ch: int | None = None, relu_on_output: bool = True) -> nn.Sequential:
    """One mlpconv block: k x k conv to `width` channels, then two 1x1 convs (the last one to out_ch, by
    default `width` too); each followed by (BN and) ReLU.

    With relu_on_output=False the block ends in a bare 1x1 conv: its output are the class maps, and a ReLU
    there could clamp every logit to zero and freeze training (loss stuck at ln(num_classes)).
    """
    out_ch = out_ch or width
    layers: list[nn.Module] = []
    specs = [(in_ch, width, kernel, stride, padding), (width, width, 1, 1, 0), (width, out_ch, 1, 1, 0)]
    for i, (cin, cout, k, s, p) in enumerate(specs):
        is_output = i == len(specs) - 1 and not relu_on_output
        layers.append(nn.Conv2d(cin, cout, k, s, p, bias=is_output or not batch_norm))
        if not is_output:
            if batch_norm:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class NiN(nn.Module):
    """NiN with the AlexNet-style geometry: mlpconv 96, 256, 384, then a last block that ends in one map per
    class; global average pooling turns the maps into logits.

    head_width is the width of the last block's 3x3 conv and first 1x1 conv, as in the paper's ImageNet
    network (1024 wide there); 0 (or None, in NiN.pth files from before this setting) makes the block
    num_classes wide throughout (the common, d2l-style layout).
    faithful=True is the classic network (no batch norm, ReLU on the class maps, dropout 0.5) for comparison;
    the default adds batch norm and leaves the class maps linear, which trains far faster and more reliably.
    """

    def __init__(self, num_classes: int, batch_norm: bool = True, dropout: float | None = None,
                 faithful: bool = False, head_width: int = HEAD_WIDTH) -> None:
        super().__init__()
        if faithful:
            batch_norm = False
        if dropout is None:
            dropout = 0.5 if faithful else 0.0
        self.num_classes = num_classes
        # What it takes to rebuild the same architecture: saved next to the weights.
        self.config = {"num_classes": num_classes, "batch_norm": batch_norm, "dropout": dropout, "faithful": faithful,
                       "head_width": head_width}
        pool = lambda: nn.MaxPool2d(3, stride=2)
        self.features = nn.Sequential(
            mlpconv(3, 96, 11, 4, 2, batch_norm), pool(), nn.Dropout(dropout),
            mlpconv(96, 256, 5, 1, 2, batch_norm), pool(), nn.Dropout(dropout),
            mlpconv(256, 384, 3, 1, 1, batch_norm), pool(), nn.Dropout(dropout),
            mlpconv(384, head_width or num_classes, 3, 1, 1, batch_norm, out_ch=num_classes,
                    relu_on_output=faithful),
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def class_maps(self, x: torch.Tensor) -> torch.Tensor:
        """One spatial map per class; the logits are their means (where the network 'looked')."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.class_maps(x))


def describe(model: nn.Module, image_size: int) -> str:
    """Each leaf layer's output shape for one image_size x image_size input, then the parameter count."""
    lines = [f"{'layer':<40} output shape"]
    hooks = [m.register_forward_hook(
        lambda m, _, out, name=name: lines.append(f"{name + ' ' + type(m).__name__:<40} {tuple(out.shape)}"))
        for name, m in model.named_modules() if not list(m.children())]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, image_size, image_size))
    for h in hooks:
        h.remove()
    params = sum(p.numel() for p in model.parameters())
    lines.append(f"parameters: {params:,}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the contract between train.py and predict.py

# Evaluation resizes the short side to IMAGE_SIZE / CROP_RATIO, then centre-crops (the ImageNet habit).
CROP_RATIO = 0.875
# ImageNet statistics: the usual choice, and close to flower_photos' own.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# Larger images are refused before decoding (100 megapixels is ~300 MB of RGB). load_image checks this itself,
# as an error, so PIL's own check, which only warns below twice its limit, is turned off.
MAX_IMAGE_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = None
MAX_ASPECT = 20  # a panorama is 4:1; a 10000x1 strip would cost gigabytes to resize to the network's size
# What counts as a photo in a folder, for all three scripts alike: a file whose name ends like a format PIL
# opens (and that is a regular file, which load_image checks).
IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)
WORKERS = min(8, os.cpu_count() or 1)  # threads that decode (and hash) photos in every script: --workers


def is_hidden(name: str) -> bool:
    """Hidden files and folders are never photos or classes in any script: .DS_Store, .ipynb_checkpoints, and the
    `._photo.jpg` of metadata that macOS writes beside photos."""
    return name.startswith(".")


def is_image_name(path: str | os.PathLike) -> bool:
    """An image by its name (and not hidden)."""
    path = Path(path)
    return path.suffix.lower() in IMAGE_EXTENSIONS and not is_hidden(path.name)


def is_photo_in(folder: Path, path: str | os.PathLike) -> bool:
    """An image by its name under folder, and in no hidden folder of it (.ipynb_checkpoints, ...)."""
    return is_image_name(path) and not any(is_hidden(part) for part in Path(path).relative_to(folder).parts)


def image_files(folder: Path) -> list[Path]:
    """The photos under folder (is_photo_in), sorted. Links to folders are followed, as torchvision's ImageFolder
    follows them for train.py; each real folder is read once, so a link to a parent cannot loop forever."""
    found, seen = [], set()
    for root, subfolders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        found += [path for name in files if is_photo_in(folder, path := Path(root, name))]
    return sorted(found)


class UnreadableImage(ValueError):
    """A file that is not an image PIL can decode, or one too large to decode safely."""


def load_image(path: str | os.PathLike, short_side: int | None = None) -> Image.Image:
    """Open any image as RGB, upright (EXIF), transparency composited on white.

    short_side lets JPEGs decode at a reduced scale (PIL draft mode) that still leaves at least that
    many pixels on the short side: several times faster for big photos, and no visible difference after
    the resize that follows. Whatever goes wrong with the file (missing, truncated, not an image, a
    decompression bomb, or any of the many errors PIL raises on damaged data) is raised as UnreadableImage.
    """
    if not os.path.isfile(path):  # a FIFO or a device would block open() forever; a dangling link is missing
        reason = "not found" if not os.path.lexists(path) else "a dangling link" if os.path.islink(path) and \
            not os.path.exists(path) else "not a regular file"
        raise UnreadableImage(f"{path}: {reason}")
    try:
        with Image.open(path) as img:
            if max(img.size) > MAX_ASPECT * max(min(img.size), 1):  # a sliver: nothing to classify, costly to resize
                raise UnreadableImage(f"{path}: {img.width}x{img.height} pixels is not a photo's shape "
                                      f"(sides over {MAX_ASPECT}:1)")
            if img.width * img.height > MAX_IMAGE_PIXELS:  # checked on the header, before any decoding
                raise UnreadableImage(f"{path}: {img.width}x{img.height} pixels is over the {MAX_IMAGE_PIXELS:,} limit "
                                      f"(a decompression bomb?)")
            if short_side is not None:
                img.draft("RGB", (short_side, short_side))
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, img)
            elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
                img = img.point(lambda v: v / 256).convert("L")  # 16-bit: keep the range, not the low byte
            return img.convert("RGB")
    except UnreadableImage:
        raise
    except Exception as error:  # PIL raises many kinds of errors on damaged files
        raise UnreadableImage(f"{path}: {first_line(error)}") from None


def resize_size(image_size: int) -> int:
    """Short side before the centre crop of evaluation (and the side of the training cache)."""
    return round(image_size / CROP_RATIO)


def eval_tensor(path: str | os.PathLike, image_size: int) -> torch.Tensor:
    """The evaluation view of one image, as uint8 [3, size, size]: resize short side, centre crop.

    train.py's validation and predict.py both call exactly this, so a prediction sees what validation saw.
    """
    side = resize_size(image_size)
    img = TF.resize(load_image(path, side), side)
    img = TF.center_crop(img, image_size)
    return TF.pil_to_tensor(img)


def normalize(batch: torch.Tensor) -> torch.Tensor:
    """Images [N, 3, H, W] in 0..255, uint8 or float, on any device, to the float input the network expects."""
    shift, scale = normalization_constants(batch.device)
    # (x / 255 - mean) / std as one fused multiply-add: a third of the memory traffic.
    return torch.addcmul(shift, batch.float(), scale)


@functools.cache
def normalization_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """normalize's -mean/std and 1/(255 std), made once per device: made from Python numbers at every call,
    they would be copied to the GPU while it waits, once per batch."""
    std = torch.tensor(STD).view(1, 3, 1, 1)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    return (-mean / std).to(device), (1 / (255 * std)).to(device)


# A photo's path and an image size to the uint8 tensor a script uses: eval_tensor, or train.train_tensor.
ToTensor = Callable[[Any, int], torch.Tensor]


def decode_images(paths: list[str | os.PathLike], to_tensor: ToTensor, image_size: int,
                  workers: int, desc: str, progress: bool = True) -> list[torch.Tensor | None]:
    """to_tensor(path, image_size) for every path, in threads (PIL releases the GIL while decoding).

    A file that cannot be decoded gets a warning naming it and None in its place.
    """
    def decode(path) -> torch.Tensor | None:
        try:
            return to_tensor(path, image_size)
        except UnreadableImage as error:
            warn(f"skipped {error}")
            return None

    with ThreadPoolExecutor(max(workers, 1)) as pool:
        return list(tqdm(pool.map(decode, paths), total=len(paths), desc=desc, unit="img",
                         disable=None if progress else True))  # None: only on a terminal


def sha256_of(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprints(paths: list[Path], workers: int) -> torch.Tensor:
    """Each photo's fingerprint: the first 8 bytes of the SHA-256 of its bytes, as an int64 (what NiN.pth
    lists its training photos by). A file that cannot be read, or is not a regular file (a pipe would block
    the read), gets none: it is left out."""
    def fingerprint(path: Path) -> int | None:
        try:
            return int.from_bytes(bytes.fromhex(sha256_of(path)[:16]), "big", signed=True) if path.is_file() else None
        except OSError:
            return None

    with ThreadPoolExecutor(max(workers, 1)) as pool:
        found = [f for f in pool.map(fingerprint, paths) if f is not None]
    return torch.tensor(found, dtype=torch.int64)


def save_class_names(classes: list[str], path: str | os.PathLike) -> None:
    """class_idx.json in the classic format: {"0": "daisy", "1": "dandelion", ...}."""
    save_json({str(i): name for i, name in enumerate(classes)}, path)


def load_class_names(path: str | os.PathLike) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"class index not found: {path} (train.py writes it)")
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as error:  # nesting, huge numbers
        raise CLIError(f"{path} is not valid JSON: {str(error)[:200]}") from None
    if (not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values())
            or set(mapping) != {str(i) for i in range(len(mapping))}):
        raise CLIError(f'{path} must map "0", "1", ... to class names, like {{"0": "daisy", "1": "dandelion"}}')
    return [mapping[str(i)] for i in range(len(mapping))]


@dataclass
class Calibration:
    """What turns the network's logits into probabilities a user can act on, stored in NiN.pth.

    temperature: the logits are divided by it before the softmax (fitted on held-out photos: mixup, CutMix and
    label smoothing squeeze a network's softmax, so its raw numbers read lower than its accuracy).
    not_sure_below: a top probability below it is answered "not sure" (0: always an answer).
    """

    temperature: float = 1.0
    not_sure_below: float = 0.0
    fitted_on: str = "nothing: the raw softmax"


def save_weights(model: NiN, classes: list[str], image_size: int, path: str | os.PathLike,
                 calibration: Calibration | None = None, trained_on: torch.Tensor | None = None) -> None:
    """NiN.pth: the state dict plus what predict.py needs to rebuild and feed the model, its calibration, and
    the fingerprints of the photos it trained on (sorted; see SavedWeights).

    Floating-point tensors are stored as float16, which halves the file; load_weights puts them back into
    the float32 model, and the predictions barely move (see tests/test_nin.py). A tensor outside float16's
    range stays float32. train.py's checkpoint.pth keeps full precision for --resume.
    """
    def compact(t: torch.Tensor) -> torch.Tensor:
        fits = t.is_floating_point() and bool(t.abs().max() <= torch.finfo(torch.float16).max)
        return t.half() if fits else t

    state = {k: compact(v.detach().cpu()) for k, v in model.state_dict().items()}
    save_torch({"model": state, "config": model.config, "classes": classes, "image_size": image_size,
                "calibration": dataclasses.asdict(calibration or Calibration()), "trained_on": trained_on}, path)


@dataclass
class SavedWeights:
    """A NiN.pth read back: the model in eval mode, its class names (in output order), the image size it was
    trained at, how its logits become probabilities, and the fingerprints of the photos it trained on (None for
    a file from before they were kept): scores on those photos say little about new ones, and a temperature
    fitted on them would be wrong."""

    model: NiN
    classes: list[str]
    image_size: int
    calibration: Calibration
    trained_on: torch.Tensor | None


def load_weights(path: str | os.PathLike, device: torch.device | str = "cpu") -> SavedWeights:
    """Rebuild what save_weights wrote, on any device (GPU weights load on a CPU-only machine), reading the file
    once and checking all of it (a CLIError for anything this code did not write). A file from before
    calibration existed gets the raw softmax."""
    saved = load_torch(path, "weights")
    config, classes, image_size = saved.get("config"), saved.get("classes"), saved.get("image_size")
    if not (isinstance(saved.get("model"), dict) and isinstance(config, dict) and isinstance(classes, list)
            and isinstance(image_size, int)):
        raise CLIError(f"{path} is not a NiN.pth written by train.py")
    known = set(inspect.signature(NiN).parameters)
    if not set(config) <= known or not isinstance(config.get("num_classes"), int):
        raise CLIError(f"{path}: its architecture settings are not NiN's (expected some of {sorted(known)})")
    if len(classes) != config["num_classes"] or not all(isinstance(c, str) for c in classes):
        raise CLIError(f"{path}: {config['num_classes']} outputs but {len(classes)} class names")
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise CLIError(f"{path}: image size {image_size} is outside {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}")
    if not all(t.isfinite().all() for t in saved["model"].values() if isinstance(t, torch.Tensor)
               and t.is_floating_point()):
        raise CLIError(f"{path} holds NaN or infinite weights (a diverged training run?)")
    try:
        model = NiN(**{"head_width": 0, **config})  # a NiN.pth from before head_width existed: the narrow block
        model.load_state_dict(saved["model"])
    except (RuntimeError, TypeError, ValueError) as error:
        raise CLIError(f"{path} does not fit the NiN architecture: {first_line(error)}") from None
    calibration = stored_calibration(saved.get("calibration"), path)
    return SavedWeights(model.to(device).eval(), list(classes), image_size, calibration,
                        stored_fingerprints(saved.get("trained_on"), path))


def stored_calibration(stored: object, path: str | os.PathLike) -> Calibration:
    """The calibration as NiN.pth holds it (None in a file from before calibration existed), checked."""
    if stored is None:
        return Calibration()
    try:
        calibration = Calibration(**stored)
        in_range = 0.01 <= calibration.temperature <= 100 and 0 <= calibration.not_sure_below < 1
    except TypeError:  # not a dictionary, other keys, or values that are not numbers
        raise CLIError(f"{path}: its calibration is not one this code wrote") from None
    if not in_range:
        raise CLIError(f"{path}: its calibration is out of range ({calibration})")
    return calibration


def stored_fingerprints(stored: object, path: str | os.PathLike) -> torch.Tensor | None:
    """The training photos' fingerprints as NiN.pth holds them (None in a file from before they were kept)."""
    if stored is not None and not (isinstance(stored, torch.Tensor) and stored.dtype == torch.int64
                                   and stored.dim() == 1):
        raise CLIError(f"{path}: its list of training photos is not one this code wrote")
    return stored


# ----------------------------------------------------------------------------------------------------- reports

ECE_BINS = 15  # equal-width confidence bins of the expected calibration error (as in Guo et al. 2017)
CALIBRATED_DRAWS = 200  # samples of a perfectly calibrated model's ECE, averaged into its floor
NOT_SURE_KEEP = 0.95  # the default "not sure" threshold answers this share of the correctly classified photos


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The single temperature T that minimises the negative log-likelihood of softmax(logits / T) on
    held-out photos (Guo et al. 2017, temperature scaling): it changes how sure the answers are, never which
    class wins."""
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)

    def nll() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits.double() / log_t.exp().double(), labels)
        loss.backward()
        return loss

    optimizer.step(nll)
    return float(log_t.detach().exp().clamp(0.05, 20))


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """How far the top probability is from the accuracy, averaged over equal-width confidence bins weighted
    by their photos (0: a top probability of p is right p of the time)."""
    confidence, predicted = probs.max(1)
    return calibration_gap(confidence.double(), (predicted == labels).double())


def calibration_gap(confidence: torch.Tensor, correct: torch.Tensor) -> float:
    """The sum over bins of (photos in the bin / photos) * |accuracy - mean confidence in the bin|, that is, of
    |photos right - sum of their confidences| over all photos."""
    which = confidence_bin(confidence)
    gap = (torch.bincount(which, weights=correct, minlength=ECE_BINS)
           - torch.bincount(which, confidence, minlength=ECE_BINS))
    return float(gap.abs().sum() / len(confidence))


def confidence_bin(confidence: torch.Tensor) -> torch.Tensor:
    """Each top probability's bin among ECE_BINS equal-width bins of [0, 1] (1.0 in the last one)."""
    return (confidence * ECE_BINS).long().clamp(0, ECE_BINS - 1)


def ece_of_a_calibrated_model(probs: torch.Tensor) -> float:
    """The expected calibration error that a perfectly calibrated model with these top probabilities would
    still show on this many photos: each photo is drawn right with its own top probability. On a few hundred
    photos the bins hold few photos each, so this floor is far from 0; an ECE near it is all a sample this
    size can show."""
    confidence = probs.max(1).values.double()
    generator = torch.Generator().manual_seed(0)
    return sum(calibration_gap(confidence, torch.bernoulli(confidence, generator=generator))
               for _ in range(CALIBRATED_DRAWS)) / CALIBRATED_DRAWS


def not_sure_threshold(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The top probability below which only (1 - NOT_SURE_KEEP) of the correctly classified photos fall."""
    confidence, predicted = probs.max(1)
    right = confidence[predicted == labels].double()
    return min(float(right.quantile(1 - NOT_SURE_KEEP)), 0.99) if len(right) else 0.0  # 1.0 would refuse every answer


def confusion_matrix(targets: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[true class, predicted class] counts, on the device of the inputs."""
    flat = targets.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes**2).view(num_classes, num_classes)


def per_class_scores(cm: torch.Tensor) -> list[tuple[float, float, float, int]]:
    """(precision, recall, F1, support) per class; 0 where a ratio has nothing to divide by."""
    cm = cm.double()
    tp, predicted, actual = cm.diag(), cm.sum(0), cm.sum(1)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), 0)
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), 0)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), 0)
    return list(zip(precision.tolist(), recall.tolist(), f1.tolist(), actual.long().tolist(), strict=True))


def classification_report(cm: torch.Tensor, classes: list[str]) -> str:
    """Per-class precision, recall, F1 and support, their macro average, and the accuracy. A class without
    photos here has no recall or F1 to give ("-"), and stays out of the average, which would count it as 0."""
    scores = per_class_scores(cm)
    width = max(len(c) for c in [*classes, "macro avg"])
    lines = [f"{'class':<{width}}  precision  recall     f1  support"]
    for c, (p, r, f, n) in zip(classes, scores, strict=True):
        recall, f1 = (f"{r:.3f}", f"{f:.3f}") if n else ("-", "-")
        lines.append(f"{c:<{width}}  {p:>9.3f}  {recall:>6}  {f1:>5}  {n:>7}")
    present = [s for s in scores if s[3] > 0]
    macro = [sum(s[i] for s in present) / max(len(present), 1) for i in range(3)]
    total = int(cm.sum())
    lines.append(f"{'macro avg':<{width}}  {macro[0]:>9.3f}  {macro[1]:>6.3f}  {macro[2]:>5.3f}  {total:>7}")
    lines.append(f"accuracy {int(cm.diag().sum())}/{total} = {cm.diag().sum().item() / max(total, 1):.4f}")
    return "\n".join(lines)


def save_confusion_matrix(cm: torch.Tensor, classes: list[str], path: str | os.PathLike, title: str) -> None:
    """The matrix as a PNG: counts in the cells, colour by share of the true class (row)."""
    plt = pyplot_for_files()
    shares = cm.double() / cm.sum(1, keepdim=True).clamp(min=1)
    size = 1.2 + 0.7 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                    color="white" if shares[i, j] > 0.5 else "black", fontsize=9)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------- plumbing


# Paths are anchored at this file, so the scripts work from any folder.
ROOT = Path(__file__).resolve().parent
DATA_DIR = ROOT / "data"
WEIGHTS_PATH = ROOT / "NiN.pth"
CLASS_IDX_PATH = ROOT / "class_idx.json"
RUNS_DIR = ROOT / "runs"
# A temporary file of atomic_write older than this is what a killed run left behind, not one being written.
STALE_SECONDS = 600
# split_data.py writes a fresh id into both train/ and val/; train.py refuses halves of different splits.
SPLIT_ID_FILE = ".split_id"
NAMES_SHOWN = 8  # a one-line message lists this many names (class folders, files) and counts the rest


class CLIError(Exception):
    """A problem with the user's input or files: reported in one line, exit code 2, no traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line, like CLIError's: the usage of a script with twenty flags would
    bury the line that matters, and --help shows it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def run_cli(main: Callable[[], None]) -> None:
    """Run a script's main(), turning CLIError into a one-line message and exit code 2 (argparse's)."""
    name = Path(sys.argv[0]).name
    for stream in (sys.stdout, sys.stderr):  # file names that are not UTF-8 are printed escaped, not a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        main()
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except BrokenPipeError:  # output piped into `head` or the like, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush fails silently
        raise SystemExit(1) from None
    except (CLIError, OSError) as error:  # OSError: a full disk, a read-only folder, ...: what the machine said
        print(f"{name}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except (MemoryError, RuntimeError) as error:  # torch.OutOfMemoryError is a RuntimeError, so is the CPU's
        if not out_of_memory(error):
            raise
        print(f"{name}: error: out of memory ({first_line(error)}); a smaller batch or image size needs less",
              file=sys.stderr)
        raise SystemExit(2) from None


def out_of_memory(error: BaseException) -> bool:
    """Whether an exception says memory ran out: on the GPU (torch.OutOfMemoryError), in the CPU's allocator
    (a RuntimeError of its own wording) or in Python (MemoryError)."""
    wording = str(error).lower()
    return (isinstance(error, (MemoryError, torch.OutOfMemoryError))
            or "out of memory" in wording or "can't allocate memory" in wording)


def check_output_file(path: Path, flag: str) -> None:
    """Refuse, before any work, a file to be written that cannot be: a folder in its place, or a folder for
    it that is a file or may not be written to."""
    if path.is_dir():
        raise CLIError(f"{flag} {path} is a folder; give a file name")
    check_output_folder(path.parent, flag)


def check_output_folder(folder: Path, flag: str) -> None:
    """Refuse, before any work, a folder to be written into that cannot be."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CLIError(f"{flag}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(f"{flag}: {existing} may not be written to")


def pick_device(name: str | None) -> torch.device:
    """--device: the named device, refused with a clear error unless it is here; None picks cuda if present,
    else Apple's mps, else the CPU."""
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise CLIError(f"--device {name}: not a device name (cpu, cuda, cuda:N, mps)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise CLIError(f"--device {name}: no such CUDA GPU here ({torch.cuda.device_count()} found)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"--device {name}: Apple's MPS is not available here")
    return device


def few(names: list[str]) -> str:
    """A list of names for a one-line message: the first NAMES_SHOWN and how many more."""
    more = f" and {len(names) - NAMES_SHOWN:,} more" if len(names) > NAMES_SHOWN else ""
    return ", ".join(names[:NAMES_SHOWN])[:300] + more


def first_line(error: BaseException) -> str:
    """What an exception says, for a one-line message: its first line, cut at 200 characters, or its type's
    name when it says nothing (libraries' messages can run to pages)."""
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def warn(message: str) -> None:
    """A problem the run survives (a bad file skipped): one line on stderr, never glued to a progress bar."""
    tqdm.write(f"warning: {message}", file=sys.stderr)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write to a temporary file beside path, flush it to disk, then rename it over path.

    A crash at any moment leaves either the old complete file or the new complete one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by a killed run
        if time.time() - stale.stat().st_mtime > STALE_SECONDS:
            stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp's 0600 would make NiN.pth private to its writer
        # Text keeps file names that are not UTF-8 as their original bytes (surrogateescape), never a crash.
        text = {} if "b" in mode else {"encoding": "utf-8", "errors": "surrogateescape"}
        with os.fdopen(fd, mode, **text) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pyplot_for_files() -> ModuleType:
    """matplotlib.pyplot drawing into files only: it never needs or waits for a display, whatever MPLBACKEND
    says (an invalid one would stop matplotlib's import)."""
    os.environ["MPLBACKEND"] = "agg"
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
    """Save a matplotlib figure atomically (format from the suffix) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=100))
    plt.close(fig)


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    try:
        atomic_write(path, lambda f: torch.save(obj, f))
    except RuntimeError as error:  # torch's writer reports a full disk as its own error: say it as the OS would
        raise OSError(f"cannot write {path}: {first_line(error)}") from None


def save_json(obj: Any, path: str | os.PathLike) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"), mode="w")


def load_torch(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """torch.load with weights_only=True (a .pth can carry code; never run it), onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"{what} not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, foreign or malicious files all end here
        if "Weights only load failed" in str(error):  # torch's advice to retry unsafely is the wrong one here
            raise CLIError(f"refused {what} {path}: it holds Python objects, not only tensors, and loading it "
                           f"could run code") from None
        raise CLIError(f"cannot load {what} {path}: {first_line(error)}") from None
    if not isinstance(obj, dict):
        raise CLIError(f"{what} {path} does not hold a dictionary of weights")
    return obj


def load_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a CSV written by save_csv."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return list(csv.DictReader(f))


def save_csv(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Rows of equal keys as a CSV with a header, written atomically."""
    def write(f) -> None:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    atomic_write(path, write, mode="w")


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-classes", type=int, default=5, help="number of classes (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="input side (default: %(default)s)")
    parser.add_argument("--faithful", action="store_true", help="the classic NiN: no batch norm, dropout 0.5")
    parser.add_argument("--head-width", type=int, default=HEAD_WIDTH,
                        help="width inside the last block; 0: num_classes (default: %(default)s)")
    args = parser.parse_args()
    if not MIN_IMAGE_SIZE <= args.image_size <= MAX_IMAGE_SIZE:
        parser.error(f"--image-size must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE}")
    if not 1 <= args.num_classes <= MAX_HEAD_WIDTH:
        parser.error(f"--num-classes must be between 1 and {MAX_HEAD_WIDTH}")
    if not 0 <= args.head_width <= MAX_HEAD_WIDTH:
        parser.error(f"--head-width must be between 0 and {MAX_HEAD_WIDTH}")
    model = NiN(args.num_classes, faithful=args.faithful, head_width=args.head_width)
    print(describe(model, args.image_size))


if __name__ == "__main__":
    main()
