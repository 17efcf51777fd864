"""Train NiN from scratch on data/train, validating on data/val.

Each photo is decoded once per run into an in-memory uint8 cache (kept on the training device, and saved
under data/.cache so the next run skips decoding); augmentation (random-resized crop and flip) is done per
batch on that device. --no-cache streams from disk through DataLoader workers instead, for datasets that do
not fit in memory. Writes the best-val weights (NiN.pth; --keep last: the last epoch's), the class map
(class_idx.json), and under --out-dir a metrics CSV (rewritten whole from the checkpoint's history, so a
resumed run never lists an epoch twice), training curves, the best epoch's confusion matrix and a resumable
checkpoint. With a val/ that holds no photos (`split_data.py --val-ratio 0`) every labelled photo trains and
NiN.pth holds the last epoch's weights.

Under torchrun (torchrun --nproc_per_node=N train.py ...) the same script trains with DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import math
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.transforms.v2 import CutMix, MixUp, RandomChoice
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from nin import (
    CLASS_IDX_PATH,
    DATA_DIR,
    HEAD_WIDTH,
    IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    RUNS_DIR,
    SPLIT_ID_FILE,
    WEIGHTS_PATH,
    CLIError,
    NiN,
    classification_report,
    confusion_matrix,
    decode_images,
    eval_tensor,
    load_image,
    load_torch,
    normalize,
    pick_device,
    resize_size,
    run_cli,
    save_class_names,
    save_confusion_matrix,
    save_csv,
    save_figure,
    save_torch,
    save_weights,
    warn,
)

# Defaults: every one is a flag below.
EPOCHS = 120
BATCH_SIZE = 64
LR = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
WARMUP_EPOCHS = 2
STEP_EPOCHS = 30
LABEL_SMOOTHING = 0.1
MIN_CROP_SCALE = 0.25
START_SIZE = 112  # progressive resizing from this side up to --image-size (0: off)
SIZE_STEP = 16  # progressive resizing grows the training images by this many pixels a stage
DROPOUT = 0.0
MIXUP = 0.2  # Beta(alpha, alpha) mixing; 0 turns it off
CUTMIX = 1.0
EMA_DECAY = 0.0  # 0 turns the weight average off
SEED = 0
WORKERS = min(8, os.cpu_count() or 1)
CACHE_FOLDER = ".cache"  # inside --data-dir
DIST_TIMEOUT_MINUTES = 10  # under torchrun: how long a process waits for a crashed peer before giving up
# What a checkpoint written before these flags existed was trained with (not today's defaults).
BEFORE_FLAG_EXISTED = {"head_width": 0, "mixup": 0.0, "cutmix": 0.0, "ema": 0.0, "start_size": 0, "keep": "best"}
# Writing the checkpoint (32 MB) and NiN.pth takes 0.15-0.3 s, half a GPU epoch: after an epoch they are
# saved only if this long has passed since the last save (every epoch on a CPU), and after the last epoch.
SAVE_SECONDS = 10
FIGURE_SECONDS = 30  # curves.png and confusion.png are redrawn at most this often (drawing costs ~0.5 s)


# --------------------------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=DATA_DIR, help="folder holding train/ and val/")
    p.add_argument("--epochs", type=int, default=EPOCHS, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="images per optimizer step")
    p.add_argument("--lr", type=float, default=LR, help="peak learning rate")
    p.add_argument("--momentum", type=float, default=MOMENTUM, help="SGD momentum (nesterov) / Adam beta1")
    p.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY, help="L2 penalty (decoupled for adamw)")
    p.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default="sgd", help="optimizer")
    p.add_argument("--schedule", choices=("cosine", "step"), default="cosine",
                   help="cosine: linear warmup then cosine decay to 0, stepped per batch; "
                        "step: x0.1 every --step-epochs epochs (the classic recipe)")
    p.add_argument("--warmup-epochs", type=float, default=WARMUP_EPOCHS, help="linear warmup (cosine only)")
    p.add_argument("--step-epochs", type=int, default=STEP_EPOCHS, help="epochs between x0.1 (step only)")
    p.add_argument("--label-smoothing", type=float, default=LABEL_SMOOTHING, help="cross-entropy smoothing")
    p.add_argument("--min-crop-scale", type=float, default=MIN_CROP_SCALE,
                   help="smallest area share of a random-resized crop")
    p.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="training and evaluation input side")
    p.add_argument("--start-size", type=int, default=START_SIZE,
                   help=f"progressive resizing: train the first epochs at this side, growing by {SIZE_STEP} px "
                        "in equal stages up to --image-size for the last (0, or a side not below --image-size: off)")
    p.add_argument("--dropout", type=float, default=DROPOUT, help="dropout between mlpconv blocks")
    p.add_argument("--head-width", type=int, default=HEAD_WIDTH,
                   help="width of the last mlpconv block's 3x3 and first 1x1 conv (0: num_classes, the usual "
                        "layout; the paper's ImageNet NiN used 1024)")
    p.add_argument("--mixup", type=float, default=MIXUP, help="mixup alpha (0: off)")
    p.add_argument("--cutmix", type=float, default=CUTMIX,
                   help="CutMix alpha (0: off); with --mixup too, each batch gets one of the two")
    p.add_argument("--ema", type=float, default=EMA_DECAY,
                   help="decay of an exponential moving average of the weights, which is then validated and "
                        "saved instead of them (0: off); it ramps up as (1+t)/(10+t) over the first steps")
    p.add_argument("--faithful", action="store_true",
                   help="the classic NiN (no batch norm, ReLU on the class maps, dropout 0.5)")
    p.add_argument("--seed", type=int, default=SEED, help="seeds weights, shuffling and augmentation")
    p.add_argument("--device", default=None,
                   help="cuda, cuda:1, mps, cpu (default: cuda, else mps, else cpu; under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--amp", choices=("bf16", "fp16", "off"), default="bf16",
                   help="mixed-precision autocast on CUDA and MPS (fp16 adds loss scaling); the CPU runs float32")
    p.add_argument("--per-process-batch", action="store_true",
                   help="under torchrun, --batch-size is per process (global batch = it x processes) "
                        "instead of the global batch split across the processes")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on CUDA, batch-norm statistics over the global batch")
    p.add_argument("--workers", type=int, default=WORKERS,
                   help="threads decoding the cache, or DataLoader processes with --no-cache")
    p.add_argument("--no-cache", action="store_true",
                   help="stream photos from disk every epoch instead of decoding them once into memory")
    p.add_argument("--weights", type=Path, default=WEIGHTS_PATH, help="where the trained weights go")
    p.add_argument("--keep", choices=("best", "last"), default="best",
                   help="which epoch's weights --weights holds: the best on val, or the last (always the last "
                        "when val/ holds no photos)")
    p.add_argument("--class-idx", type=Path, default=CLASS_IDX_PATH, help="where the class map goes")
    p.add_argument("--out-dir", type=Path, default=RUNS_DIR, help="metrics.csv and checkpoint.pth go here")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in --out-dir/checkpoint.pth, with its own settings")
    args = p.parse_args(argv)
    checks = [(args.epochs >= 1, "--epochs must be at least 1"),
              (args.batch_size >= 2, "--batch-size must be at least 2 (batch norm needs two images)"),
              (args.lr > 0, "--lr must be positive"),
              (args.weight_decay >= 0, "--weight-decay must not be negative"),
              (0 <= args.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
              (0 < args.min_crop_scale <= 1, "--min-crop-scale must be in (0, 1]"),
              (args.image_size >= MIN_IMAGE_SIZE, f"--image-size must be at least {MIN_IMAGE_SIZE}"),
              (args.start_size == 0 or args.start_size >= MIN_IMAGE_SIZE,
               f"--start-size must be 0 (off) or at least {MIN_IMAGE_SIZE}"),
              (0 <= args.dropout < 1, "--dropout must be in [0, 1)"),
              (args.head_width >= 0, "--head-width must not be negative"),
              (args.mixup >= 0 and args.cutmix >= 0, "--mixup and --cutmix must not be negative"),
              (0 <= args.ema < 1, "--ema must be in [0, 1)"),
              (args.warmup_epochs >= 0, "--warmup-epochs must not be negative"),
              (args.step_epochs >= 1, "--step-epochs must be at least 1"),
              (args.workers >= 0, "--workers must not be negative")]
    for ok, message in checks:
        if not ok:
            p.error(message)
    return args


# --------------------------------------------------------------------------------------------- data


def find_images(split_dir: Path) -> ImageFolder:
    """ImageFolder's listing of split_dir, with its errors turned into advice."""
    if not split_dir.is_dir():
        raise CLIError(f"{split_dir} not found: run `python split_data.py` first")
    try:
        return ImageFolder(split_dir)
    except OSError as error:  # no class folders, an empty class, a folder we may not read
        raise CLIError(f"{split_dir}: {error}") from None


def find_val_images(val_dir: Path) -> ImageFolder | None:
    """find_images for val/, or None when it holds no photos at all (split_data.py --val-ratio 0)."""
    if val_dir.is_dir() and not any(has_file_allowed_extension(f.name, IMG_EXTENSIONS) for f in val_dir.rglob("*")):
        return None
    return find_images(val_dir)


def check_same_split(train: ImageFolder, val: ImageFolder | None, train_dir: Path, val_dir: Path) -> None:
    if val is not None and train.classes != val.classes:
        raise CLIError(f"{train_dir} and {val_dir} have different classes: "
                       f"{train.classes} vs {val.classes}")
    ids = [d / SPLIT_ID_FILE for d in (train_dir, val_dir)]
    if all(p.exists() for p in ids) and ids[0].read_text() != ids[1].read_text():
        raise CLIError(f"{train_dir} and {val_dir} come from different runs of split_data.py "
                       f"(it was interrupted?): run it again")


def train_tensor(path: str, image_size: int) -> torch.Tensor:
    """A training photo for the cache: short side resized as for evaluation, centre square kept, uint8.

    The random crops are cut from this square per batch, on the training device.
    """
    side = resize_size(image_size)
    img = load_image(path, side)
    return TF.pil_to_tensor(TF.center_crop(TF.resize(img, side), side))


def decode_all(samples: list[tuple[str, int]], to_tensor, image_size: int, workers: int,
               desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every photo once, skipping unreadable ones with a warning: uint8 images and their labels."""
    images = decode_images([path for path, _ in samples], to_tensor, image_size, workers, desc)
    keep = [i for i, img in enumerate(images) if img is not None]
    if not keep:
        raise CLIError(f"no readable images for {desc}")
    return (torch.stack([images[i] for i in keep]),
            torch.tensor([samples[i][1] for i in keep], dtype=torch.long))


def cached_decode(samples: list[tuple[str, int]], to_tensor, image_size: int, workers: int, desc: str,
                  cache_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """decode_all, remembered in cache_dir under a key made of the file list (names, sizes, times) and size."""
    key = hashlib.sha256(f"{to_tensor.__name__}:{image_size}".encode())
    for path, label in samples:
        st = os.stat(path)
        key.update(f"{path}:{label}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    cache_file = cache_dir / f"{desc}-{image_size}px-{key.hexdigest()[:16]}.pt"
    if cache_file.is_file():
        try:
            cached = load_torch(cache_file, "cache")
            return cached["images"], cached["labels"]
        except (CLIError, KeyError):
            warn(f"ignored a damaged cache file {cache_file}")
    images, labels = decode_all(samples, to_tensor, image_size, workers, desc)
    for stale in cache_dir.glob(f"{desc}-{image_size}px-*.pt"):
        stale.unlink(missing_ok=True)
    save_torch({"images": images, "labels": labels}, cache_file)
    return images, labels


class StreamedImages(Dataset):
    """--no-cache: the same uint8 tensors as the cache, decoded on the fly in DataLoader workers."""

    def __init__(self, samples: list[tuple[str, int]], to_tensor, image_size: int) -> None:
        self.samples, self.to_tensor, self.image_size = samples, to_tensor, image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return self.to_tensor(path, self.image_size), label


def random_resized_crop_flip(images: torch.Tensor, size: int, min_scale: float) -> torch.Tensor:
    """Random-resized crop (area min_scale..1, aspect 3/4..4/3) and horizontal flip for a whole batch.

    One grid_sample call on the batch's device instead of a Python loop over images. The crops are
    axis-aligned, so the sampling grid is an outer sum built by broadcasting (affine_grid's batched matmul
    costs more than the sampling itself on a CPU). Returns float images in [0, 255].
    """
    n, device = images.shape[0], images.device
    area = torch.empty(n, 1, 1, device=device).uniform_(min_scale, 1)
    aspect = torch.empty(n, 1, 1, device=device).uniform_(math.log(3 / 4), math.log(4 / 3)).exp()
    half_w = (area * aspect).sqrt().clamp(max=1)  # in grid_sample's [-1, 1] coordinates
    half_h = (area / aspect).sqrt().clamp(max=1)
    cx = (torch.rand(n, 1, 1, device=device) * 2 - 1) * (1 - half_w)
    cy = (torch.rand(n, 1, 1, device=device) * 2 - 1) * (1 - half_h)
    flip = torch.where(torch.rand(n, 1, 1, device=device) < 0.5, -1.0, 1.0)
    steps = (torch.arange(size, device=device) * 2 + 1) / size - 1  # pixel centres, align_corners=False
    x = (cx + half_w * flip * steps.view(1, 1, size)).expand(n, size, size)
    y = (cy + half_h * steps.view(1, size, 1)).expand(n, size, size)
    grid = torch.stack((x, y), dim=-1)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, order: torch.Tensor | None = None,
            rank: int = 0, world: int = 1):
    """Batches of in-memory tensors, in `order` (a permutation) or in sequence.

    With a shuffling order the incomplete last batch is dropped (batch norm dislikes tiny batches). Under
    torchrun each of the `world` processes takes every world-th image of the same global order, so the
    processes see disjoint shards of the epoch and the same number of steps.
    """
    n = len(labels)
    if order is None:
        order = torch.arange(n)
        stop = n
    else:
        stop = max(n // (batch_size * world), 1) * batch_size * world
    mine = order[:stop][rank::world].to(images.device)
    for start in range(0, len(mine), batch_size):
        idx = mine[start:start + batch_size]
        yield images[idx], labels[idx]


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle of one epoch: the same in every process, and again after --resume."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


# --------------------------------------------------------------------------------------------- training


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    # No weight decay on biases and batch-norm parameters: it only fights their scale.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=True)
    optimizer = torch.optim.Adam if args.optimizer == "adam" else torch.optim.AdamW
    return optimizer(groups, lr=args.lr, betas=(args.momentum, 0.999))


def make_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per batch."""
    if args.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, args.step_epochs * steps_per_epoch, gamma=0.1)
    total = args.epochs * steps_per_epoch
    warmup = min(round(args.warmup_epochs * steps_per_epoch), total - 1)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total - warmup)
    if warmup == 0:
        return cosine
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / warmup, total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


def make_mixer(args: argparse.Namespace, num_classes: int) -> RandomChoice | None:
    """torchvision's batch-level mixup and/or CutMix (each batch mixed with itself rolled by one), or None."""
    mixers = ([MixUp(alpha=args.mixup, num_classes=num_classes)] if args.mixup > 0 else []) + \
             ([CutMix(alpha=args.cutmix, num_classes=num_classes)] if args.cutmix > 0 else [])
    return RandomChoice(mixers) if mixers else None


def training_size(epoch: int, epochs: int, start_size: int, image_size: int) -> int:
    """The side of an epoch's training crops. Progressive resizing cuts the run into equal stages whose sizes
    grow from start_size to image_size by SIZE_STEP: the early epochs, which learn coarse shapes, cost a
    fraction of a full-size one, and the last stage trains at the size that validation and predict.py use,
    so the weights and batch-norm statistics end up tuned to it. A run of fewer epochs than stages skips the
    smallest sizes, so that it too ends at image_size."""
    sizes = [*range(start_size or image_size, image_size, SIZE_STEP), image_size][-epochs:]
    return sizes[(epoch - 1) * len(sizes) // epochs]


def augment(images: torch.Tensor, labels: torch.Tensor, size: int, args: argparse.Namespace,
            mixer: RandomChoice | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of cached uint8 images to the network's training input (cropped to size x size, flipped,
    normalised, maybe mixed) and its targets: the labels, or class probabilities when mixed."""
    x = normalize(random_resized_crop_flip(images, size, args.min_crop_scale))
    if mixer is not None:
        x, labels = mixer(x, labels)
    return x.contiguous(memory_format=torch.channels_last), labels


def make_ema(model: torch.nn.Module, decay: float) -> AveragedModel:
    """A moving average of the weights and batch-norm statistics. Its decay ramps up as (1+t)/(10+t) to
    `decay`: a fixed 0.999 would still hold 13% of the random initial weights after 2,000 steps, which is
    a whole run here."""
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        t = int(num_averaged)
        get_ema_multi_avg_fn(min(decay, (1 + t) / (10 + t)))(averaged, current, num_averaged)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def optimize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
             x: torch.Tensor, targets: torch.Tensor, label_smoothing: float,
             autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a ready batch (targets: labels or class probabilities); returns the (detached)
    loss and logits.

    The scaler only acts for --amp fp16 (float16 gradients underflow without it); otherwise it passes through.
    """
    with autocast:
        logits = model(x)
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), logits.detach()


def train_one_epoch(model, optimizer, scaler, scheduler, loader, steps: int, args, device, epoch: int,
                    size: int, autocast, main_process: bool, mixer: RandomChoice | None,
                    ema: AveragedModel | None) -> tuple[float, float]:
    """Loss and accuracy of the epoch's (augmented) training batches, over every process (with mixing, the
    accuracy counts each image's own label, whatever share of it survived the mix)."""
    model.train()
    totals = torch.zeros(3, device=device)  # loss sum, correct, images
    bar = tqdm(loader, total=steps, desc=f"epoch {epoch}/{args.epochs} ({size} px)", unit="batch", leave=False,
               disable=not main_process)
    start = time.perf_counter()
    for step, (images, labels) in enumerate(bar):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        x, targets = augment(images, labels, size, args, mixer)
        loss, logits = optimize(model, optimizer, scaler, x, targets, args.label_smoothing, autocast)
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        # torch.full, not torch.tensor: copying a number to a GPU would wait for it, every step.
        totals += torch.stack([loss * len(labels), (logits.argmax(1) == labels).sum(),
                               torch.full((), len(labels), device=device)])
        if step % 10 == 0 and main_process:  # .item() waits for the GPU: not every step
            bar.set_postfix(loss=f"{loss.item():.3f}",
                            img_s=f"{totals[2].item() / (time.perf_counter() - start):.0f}/process")
    loss_sum, correct, seen = all_reduce_sum(totals).tolist()
    return loss_sum / seen, correct / seen


@torch.no_grad()
def evaluate(model, images: torch.Tensor, labels: torch.Tensor, num_classes: int, batch_size: int, device,
             autocast, rank: int = 0, world: int = 1) -> tuple[float, torch.Tensor]:
    """Validation loss and confusion matrix; under torchrun each process scores a shard, then they are summed."""
    model.eval()
    loss_sum = torch.zeros(1, device=device)
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    for x, y in batches(images, labels, batch_size, rank=rank, world=world):
        x = normalize(x.to(device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with autocast:
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        cm += confusion_matrix(y, logits.argmax(1), num_classes)
    all_reduce_sum(loss_sum)
    all_reduce_sum(cm)
    return loss_sum.item() / cm.sum().item(), cm.cpu()


def best_row(history: list[dict]) -> dict:
    """The first epoch with the highest val accuracy: the one whose weights are in NiN.pth (unless --keep last)."""
    return max(history, key=lambda h: h["val_acc"])


def summary(history: list[dict], best_cm: torch.Tensor | None, classes: list[str], keep_last: bool,
            weights: Path) -> str:
    """The end-of-run report: the best epoch's scores, and the last epoch's accuracy beside the best one (the
    best was chosen on these same photos, so it reads high), naming the epoch whose weights were saved."""
    last = history[-1]
    if best_cm is None:
        return f"\nno validation photos: {weights.name} holds the last epoch's weights (epoch {last['epoch']})"
    best = best_row(history)
    held = f"the last epoch's (epoch {last['epoch']})" if keep_last else f"the best epoch's (epoch {best['epoch']})"
    return (f"\nbest epoch on val:\n{classification_report(best_cm, classes)}\n"
            f"val accuracy: last epoch {last['val_acc']:.4f}, best epoch {best['val_acc']:.4f} (epoch {best['epoch']}; "
            f"chosen on these photos, so it reads high); {weights.name} holds {held} weights")


def save_curves(history: list[dict], path: Path) -> None:
    """Loss, accuracy, learning rate and training size by epoch, as one PNG."""
    import matplotlib
    matplotlib.use("Agg")  # files only: never needs or waits for a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax, lr_ax) = plt.subplots(1, 3, figsize=(14, 3.8))
    validated = history[-1]["val_acc"] != ""
    for split, style in (("train", "-"), ("val", "-o"))[:1 + validated]:
        loss_ax.plot(epochs, [h[f"{split}_loss"] for h in history], style, markersize=3, label=split)
        acc_ax.plot(epochs, [h[f"{split}_acc"] for h in history], style, markersize=3, label=split)
    if validated:
        best = best_row(history)
        acc_ax.axhline(best["val_acc"], color="grey", linestyle=":", linewidth=1)
        acc_ax.set_title(f"accuracy (best val {best['val_acc']:.1%}, epoch {best['epoch']}; "
                         f"last {history[-1]['val_acc']:.1%})")
    else:
        acc_ax.set_title("accuracy (no validation photos)")
    loss_ax.set_title("loss (train: augmented, mixed, smoothed labels)")
    lr_ax.plot(epochs, [float(h["lr"]) for h in history], "-", color="tab:green")
    lr_ax.set_title("learning rate (start of epoch)")
    lr_ax.set_ylabel("learning rate", color="tab:green")
    sizes = [h["size"] for h in history]
    if len(set(sizes)) > 1:  # progressive resizing: the training size on a second axis, its steps on the others
        size_ax = lr_ax.twinx()
        size_ax.step(epochs, sizes, where="mid", color="tab:purple")
        size_ax.set_ylabel("training size (px)", color="tab:purple")
        lr_ax.set_title("learning rate and training size")
        for (_, before), (epoch, size) in itertools.pairwise(zip(epochs, sizes, strict=True)):
            if size != before:
                for ax in (loss_ax, acc_ax):
                    ax.axvline(epoch - 0.5, color="grey", linewidth=0.8, alpha=0.5)
    for ax in (loss_ax, acc_ax, lr_ax):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no "epoch 1.5" ticks on short runs
        ax.grid(alpha=0.3)
    loss_ax.legend()
    acc_ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


# --------------------------------------------------------------------------------------------- devices


def start_distributed(device_arg: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK) this joins the
    process group: NCCL with one GPU per process, gloo on the CPU."""
    requested = pick_device(device_arg)
    if "RANK" not in os.environ:
        return 0, 1, requested
    if requested.type == "mps":  # gloo would quietly train on the CPU instead
        raise CLIError("torchrun trains on CUDA GPUs or the CPU, not on Apple's MPS: pass --device cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = requested.type == "cuda"  # under torchrun only its type counts: the GPU is the LOCAL_RANK's
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    # A crashed process must not leave the others waiting forever in a collective.
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=DIST_TIMEOUT_MINUTES))
    return dist.get_rank(), dist.get_world_size(), device


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    checkpoint_path = args.out_dir / "checkpoint.pth"
    checkpoint = None
    if args.resume:
        checkpoint = load_torch(checkpoint_path, "checkpoint")
        keep = {"device": args.device, "workers": args.workers}
        args = argparse.Namespace(**{**vars(args), **BEFORE_FLAG_EXISTED, **checkpoint["args"], **keep})
        for name in ("data_dir", "weights", "class_idx", "out_dir"):
            setattr(args, name, Path(getattr(args, name)))
    rank, world, device = start_distributed(args.device)
    main_process = rank == 0
    say = print if main_process else lambda *a, **k: None
    batch_size = args.batch_size if args.per_process_batch else args.batch_size // world
    if batch_size < 2:
        raise CLIError(f"--batch-size {args.batch_size} leaves fewer than 2 images per process")
    torch.manual_seed(args.seed + rank)  # each process its own augmentations
    # A handful of input shapes per run: cuDNN times its algorithms once per shape and keeps the fastest.
    torch.backends.cudnn.benchmark = True
    use_amp = args.amp != "off" and device.type in ("cuda", "mps")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16,
                              enabled=use_amp)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and args.amp == "fp16")

    train_dir, val_dir = args.data_dir / "train", args.data_dir / "val"
    train_set, val_set = find_images(train_dir), find_val_images(val_dir)
    check_same_split(train_set, val_set, train_dir, val_dir)
    classes = train_set.classes
    keep_last = args.keep == "last" or val_set is None
    say(f"{len(train_set)} training and {len(val_set or [])} validation images, {len(classes)} classes; "
        f"device {device}" + (f", {world} processes x batch {batch_size}" if world > 1 else ""))
    if val_set is None:
        say(f"{val_dir} holds no photos: every labelled photo trains, there is nothing to validate on, and "
            f"{args.weights.name} will hold the last epoch's weights")

    def decode(samples, to_tensor, desc):
        if args.no_cache:
            return decode_all(samples, to_tensor, args.image_size, args.workers, desc)
        # The first process decodes and writes the disk cache; the others then read it.
        if not main_process:
            barrier()
        result = cached_decode(samples, to_tensor, args.image_size, args.workers, desc,
                               args.data_dir / CACHE_FOLDER)
        if main_process:
            barrier()
        return result

    if val_set is not None:
        val_images, val_labels = decode(val_set.samples, eval_tensor, "val")
        val_images, val_labels = val_images.to(device), val_labels.to(device)
    if args.no_cache:
        streamed = StreamedImages(train_set.samples, train_tensor, args.image_size)
        sampler = DistributedSampler(streamed, world, rank, shuffle=True, seed=args.seed, drop_last=True)
        loader = DataLoader(streamed, batch_size, sampler=sampler, drop_last=len(train_set) >= batch_size * world,
                            num_workers=args.workers, pin_memory=device.type == "cuda",
                            persistent_workers=args.workers > 0)
        steps = len(loader)

        def epoch_batches(epoch: int):
            sampler.set_epoch(epoch)
            return loader
    else:
        train_images, train_labels = decode(train_set.samples, train_tensor, "train")
        train_images, train_labels = train_images.to(device), train_labels.to(device)
        steps = max(len(train_labels) // (batch_size * world), 1)

        def epoch_batches(epoch: int):
            order = epoch_order(len(train_labels), args.seed, epoch)
            return batches(train_images, train_labels, batch_size, order, rank, world)

    model = NiN(len(classes), dropout=None if args.faithful else args.dropout, faithful=args.faithful,
                head_width=args.head_width or None)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, args)
    scheduler = make_scheduler(optimizer, args, steps)
    mixer = make_mixer(args, len(classes))
    ema = make_ema(model, args.ema) if args.ema > 0 else None
    start_epoch, best_acc, best_cm, history = 1, 0.0, None, []
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if ema is not None:
            ema.load_state_dict(checkpoint["ema"])
        start_epoch, best_acc = checkpoint["epoch"] + 1, checkpoint["best_acc"]
        # Each epoch's training size; a checkpoint from before that column gets it from its settings.
        history = [{"size": training_size(h["epoch"], args.epochs, args.start_size, args.image_size), **h}
                   for h in checkpoint["history"]]
        best_cm = checkpoint["best_confusion"]
        say(f"resumed {checkpoint_path} after epoch {checkpoint['epoch']} (best val acc {best_acc:.4f})")
    trained = model  # the plain model, without the DDP wrapper
    if world > 1:
        if args.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            trained = model
        model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    validated = model if ema is None else ema.module  # what is validated and saved as NiN.pth
    if main_process:
        save_class_names(classes, args.class_idx)

    saved_epoch, saved_at, drawn_at = start_epoch - 1, -math.inf, -math.inf
    unsaved_best = None  # the best epoch's weights while they wait for the next save
    try:
        for epoch in range(start_epoch, args.epochs + 1):
            start = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            size = training_size(epoch, args.epochs, args.start_size, args.image_size)
            train_loss, train_acc = train_one_epoch(model, optimizer, scaler, scheduler, epoch_batches(epoch), steps,
                                                    args, device, epoch, size, autocast, main_process, mixer, ema)
            val_loss = val_acc = None
            if val_set is not None:
                val_loss, val_cm = evaluate(validated, val_images, val_labels, len(classes), batch_size * 2, device,
                                            autocast, rank, world)
                val_acc = val_cm.diag().sum().item() / val_cm.sum().item()
            seconds = time.perf_counter() - start
            history.append({"epoch": epoch, "train_loss": round(train_loss, 4), "train_acc": round(train_acc, 4),
                            "val_loss": "" if val_loss is None else round(val_loss, 4),
                            "val_acc": "" if val_acc is None else round(val_acc, 4), "lr": f"{lr:.3g}",
                            "size": size, "seconds": round(seconds, 1)})
            # The same in every process: val_cm is summed.
            best = val_acc is not None and (best_cm is None or val_acc > best_acc)
            if best:
                best_acc, best_cm = val_acc, val_cm
            if main_process:
                if best and not keep_last:  # a copy on the device, written at the next save
                    unsaved_best = copy.deepcopy(trained if ema is None else ema.module)
                if epoch == args.epochs or time.monotonic() - saved_at >= SAVE_SECONDS:
                    if keep_last:  # the weights of the epoch the checkpoint holds
                        save_weights(trained if ema is None else ema.module, classes, args.image_size, args.weights)
                    elif unsaved_best is not None:
                        save_weights(unsaved_best, classes, args.image_size, args.weights)
                        unsaved_best = None
                    save_torch({"model": trained.state_dict(), "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict(), "epoch": epoch, "best_acc": best_acc,
                                "best_confusion": best_cm, "history": history,
                                "ema": None if ema is None else ema.state_dict(), "classes": classes,
                                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}},
                               checkpoint_path)
                    saved_epoch, saved_at = epoch, time.monotonic()
                    if epoch == args.epochs or saved_at - drawn_at > FIGURE_SECONDS:
                        save_curves(history, args.out_dir / "curves.png")
                        if best_cm is not None:
                            save_confusion_matrix(best_cm, classes, args.out_dir / "confusion.png",
                                                  f"val, best epoch {best_row(history)['epoch']}: {best_acc:.1%}")
                        drawn_at = time.monotonic()
                    save_csv(history, args.out_dir / "metrics.csv")  # last: a complete row means a saved epoch
                val_text = ("no val" if val_acc is None else
                            f"val loss {val_loss:.4f} acc {val_acc:.4f}{' *' if best else '  '}")
                tqdm.write(f"epoch {epoch:3d}/{args.epochs}  train loss {train_loss:.4f} acc {train_acc:.4f}  "
                           f"{val_text}  lr {lr:.3g}  {size} px  {seconds:.1f}s")
    except KeyboardInterrupt:
        if saved_epoch == 0:
            raise CLIError("interrupted during the first epoch: nothing to resume yet") from None
        raise CLIError(f"interrupted; epoch {saved_epoch} is saved in {checkpoint_path}: "
                       f"`python train.py --resume` finishes the run") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    say(summary(history, best_cm, classes, keep_last, args.weights))
    say(f"weights in {args.weights}, classes in {args.class_idx}; curves"
        f"{'' if best_cm is None else ' and confusion matrix'} in {args.out_dir}")


if __name__ == "__main__":
    run_cli(main)
