"""Train NiN from scratch on data/train, validating on data/val.

Each photo is decoded once per run into an in-memory uint8 cache (kept on the training device, and saved
under data/.cache so the next run skips decoding); augmentation (random-resized crop and flip, then mixup or
CutMix, but not in the last --unmixed-share of the epochs) is done per batch on that device. --no-cache streams
the training photos from disk through DataLoader workers instead, for datasets that do not fit in memory (val/ is
still decoded once). Writes the weights of the best epoch on val (NiN.pth; --keep last: the last epoch's), the
class map (class_idx.json), and under --out-dir a metrics CSV, training curves, the best epoch's confusion matrix
and a checkpoint that --resume continues from. With a val/ that holds no photos (`split_data.py --val-ratio 0`)
every labelled photo trains and NiN.pth holds the last epoch's weights.

Under torchrun (torchrun --nproc_per_node=N train.py ...) the same script trains with DistributedDataParallel.
"""

# Read main() first: it is the recipe, and each step it takes is a function or a small class below it.

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import functools
import gc
import hashlib
import itertools
import math
import os
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate
from torchvision.datasets import ImageFolder
from torchvision.transforms.v2 import CutMix, MixUp, RandomChoice
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

import nin

# The defaults of the flags of the same names.
EPOCHS = 120
BATCH_SIZE = 64
LR = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
WARMUP_EPOCHS = 2
STEP_EPOCHS = 30
LABEL_SMOOTHING = 0.0
MIN_CROP_SCALE = 0.25
START_SIZE = 112  # progressive resizing from this side up to --image-size (0: off)
DROPOUT = 0.0
MIXUP = 0.2  # Beta(alpha, alpha) mixing; 0 turns it off
CUTMIX = 1.0
UNMIXED_SHARE = 0.125  # this share of the epochs, at the end, trains on whole photos with their own labels, so
                       # the softmax ends up nearer a probability (bench/RESULTS.md: the unmixed-end entry)
EMA_DECAY = 0.0  # 0 turns the weight average off
SEED = 0

# Fixed choices, not flags.
SIZE_STEP = 16  # progressive resizing grows the training images by this many pixels a stage
CACHE_FOLDER = ".cache"  # inside --data-dir
DIST_TIMEOUT_MINUTES = 10  # under torchrun: how long a process waits for a crashed peer before giving up
VAL_BATCH = 128  # images a validation batch scores at once (it learns nothing, so only memory limits it)
# What --resume reads from a checkpoint.pth (a NiN.pth, or any other .pth, lacks them).
CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "epoch", "history", "args", "classes", "best_acc",
                   "best_confusion"}
# What a checkpoint written before these flags and settings existed was trained with (not today's defaults).
BEFORE_FLAG_EXISTED = {"head_width": 0, "mixup": 0.0, "cutmix": 0.0, "ema": 0.0, "start_size": 0, "keep": "best",
                       "time": None, "val_every": 1, "plan_epochs": None, "unmixed_share": 0.0}
# Writing the checkpoint and NiN.pth takes a sizeable share of a GPU epoch, so after an epoch they are saved
# only when this long has passed since the last save, and after the last epoch; where epochs are longer than
# this, as on most CPUs, every epoch is saved.
SAVE_SECONDS = 10
FIGURE_SECONDS = 30  # curves.png and confusion.png are redrawn at most this often (drawing is slow)
# A --time run tells a re-plan at most this often: with short epochs the plan moves by an epoch or two at almost
# every one, and the epoch lines show the plan in between.
REPLAN_NOTE_SECONDS = 30
# --amp auto on a CPU takes bf16 only where it clearly pays: two timed steps are noisy, and a close call is not
# worth bf16's coarser arithmetic.
BF16_SHARE = 0.8
# ... and is not timed at the run's batch where a step of PROBE_BATCH images takes longer in bf16 than this many
# float32 ones: bf16 emulated in software is several times slower than float32 even on a few images, and a step
# of it at the run's batch would take a good part of a small --time budget. Native bf16 should come nowhere near
# that factor once its kernels are built for the shape, which the untimed step before the timed ones pays for.
EMULATED_BF16_STEPS = 4
PROBE_BATCH = 4  # few enough images that even emulated bf16 steps them quickly; at least 2 (batch norm)
PRECISION_NAMES = {"off": "float32", "bf16": "bf16 autocast", "fp16": "fp16 autocast with loss scaling"}

# --time, the time budget:
# What the measurements of 30-minute runs on two CPU cores say a short run needs (bench/RESULTS.md, the CPU
# route): smaller images, more steps of a smaller batch, no mixing, label smoothing and a stronger weight decay.
SHORT_RECIPE = {"image_size": 112, "start_size": 80, "batch_size": 32, "mixup": 0.0, "cutmix": 0.0,
                "label_smoothing": 0.2, "weight_decay": 1e-3}
# A budget that fits this many epochs of the default recipe gets it even while the short recipe would not fit
# all of its own epochs: cross-validated on two CPU cores (bench/RESULTS.md, the entry that set it), about this
# many epochs of the default recipe scored as well as the short recipe's whole run, so at least as well as fewer
# of its epochs. It also matters because the recipe is chosen once: a run whose timed steps caught the machine
# in a slow moment plans fewer epochs than will fit, and a plan may grow to its recipe's epochs but never
# changes recipe. Below it, the default recipe still gets the budget once the short recipe's whole run fits
# with time to spare: the spare time would go unused, and the default recipe calibrates better.
MIN_DEFAULT_EPOCHS = 50
# On a CPU a step of 32 images trains about as many images a second as one of 64, so a budget buys twice the steps,
# and the default recipe's 30 minutes cross-validated higher at 32 on two CPU cores (bench/RESULTS.md, the entry
# that set it). On a GPU a smaller batch only runs slower: there a plan keeps the recipe's.
CPU_BATCH_SIZE = 32
PLAN_SHARE = 0.95  # a plan fills this share of --time; the rest absorbs noise, and the last save until it is timed
VAL_SHARE = 0.03  # validation may take this share of a --time budget; beyond it, some epochs go unvalidated
VAL_LAST_EPOCHS = 3  # ... but the last epochs are always validated
TIMED_STEPS = 2  # per training size, after one untimed step (cuDNN chooses its algorithms on the first)


# --------------------------------------------------------------------------------------------- the recipe


def main() -> None:
    clock = Clock()
    args = parse_args()
    given = explicit_flags(sys.argv[1:])  # the flags written on the command line, not left at their defaults
    args, checkpoint = resume(args, given)
    run = start_run(args.device)
    check_device_flags(args, run)
    torch.manual_seed(args.seed + run.rank)  # each process its own augmentations
    check_outputs(args)
    photos = find_photos(args.data_dir, run)
    trained_on = training_fingerprints(photos[0], args.workers, run)  # NiN.pth lists them: predict.py knows them
    if checkpoint is not None and checkpoint["classes"] != photos[0].classes:
        raise nin.CLIError(f"the class folders changed since this run started ({nin.few(checkpoint['classes'])} -> "
                           f"{nin.few(photos[0].classes)}): start a new run instead of --resume")
    if checkpoint is None or checkpoint["epoch"] < args.epochs:  # a finished run resumed has nothing to time
        run.use_amp(choose_amp(args, len(photos[0].classes), run))
    pace = None
    if args.time and checkpoint is None:  # --time: the recipe and the epochs that fit, from timed steps here
        args, pace = plan_for_budget(args, given, photos, clock, run)
    data = load_data(photos, args.data_dir, args.image_size, per_process_batch(args, run), args.workers,
                     args.no_cache, args.seed, run)
    learner = Learner(make_model(len(data.classes), args), args, data.steps, run)
    progress = Progress()
    if checkpoint is not None:
        learner.load_state_dict(checkpoint)
        progress = Progress.from_checkpoint(checkpoint, args)
        learner.unmixing = bool(unmixed_epochs(progress.history))  # once begun, even if a --time plan grows
        clock.spent_before = checkpoint.get("seconds_spent", 0.0)
        best = f" (best val acc {progress.best_acc:.4f})" if data.val else ""
        run.say(f"resumed {checkpoint_path(args.out_dir)} after epoch {progress.epoch}{best}")
    if progress.epoch >= args.epochs:  # resumed after its last epoch: the saver only puts NiN.pth right
        run.say(f"this run had finished its {args.epochs} epochs: nothing more to train")
    else:
        pace = pace or measure_pace(args, len(data.classes), data.steps, len(data.val[1]) if data.val else 0, run)
        clock.predict(pace, args, data.steps, progress.epoch, run)
    saver = Saver(args, data.classes, keep_last=args.keep == "last" or data.val is None,
                  saved_epoch=progress.epoch, trained_on=trained_on, clock=clock, run=run)
    if checkpoint is not None:
        saver.resume(checkpoint, learner)
        continue_random_numbers(checkpoint.get("rng"), args.seed, progress.epoch, run)
    with resume_hint_on_ctrl_c(saver, args.out_dir):
        while progress.epoch < args.epochs:  # --time may re-plan args.epochs after any epoch
            epoch, start = progress.epoch + 1, time.perf_counter()
            lr = learner.lr
            size = training_size(epoch, args.epochs, args.start_size, args.image_size)
            train_loss, train_acc = train_one_epoch(learner, data.batches(epoch), data.steps, size, run,
                                                    desc=f"epoch {epoch}/{args.epochs} ({size} px)")
            fits = clock.epochs_that_fit(pace, args, data.steps, epoch, time.perf_counter() - start, run)
            if fits != args.epochs:  # --time on a machine slower or faster than measured
                args.epochs = fits
                learner.reschedule(fits)
            last = epoch == args.epochs
            validate = data.val is not None and (last or validates(epoch, args.epochs, args.val_every))
            val_loss, val_cm = evaluate(learner.final, *data.val, len(data.classes), run) if validate else (None, None)
            improved = progress.record(epoch, train_loss, train_acc, val_loss, val_cm, lr, size,
                                       time.perf_counter() - start, mixed=learner.mixes(), planned=args.epochs)
            saver.after_epoch(learner, progress, improved, last=last)
            barrier()  # under torchrun the others wait for the first one's save here, not in the next epoch's time
            run.say(progress.line(improved), write=tqdm.write)
    run.say(summary(progress, data.classes, saver.keep_last, args.weights))
    run.say(clock.report(args))
    run.say(f"weights in {args.weights}, classes in {args.class_idx}; curves"
            f"{'' if progress.best_cm is None else ' and confusion matrix'} in {args.out_dir}")


# --------------------------------------------------------------------------------------------- arguments


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's paragraphs and shows each flag's default, unless there is none to show
    (a switch that is off, or a default the flag's own help explains)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def arg_parser() -> argparse.ArgumentParser:
    # No abbreviated flags: --epoch would slip past the check that --time and --epochs are not both given.
    # prog: bench/cv.py checks its train.py flags with this parser, and its errors must say whose flags they are.
    p = nin.ArgumentParser(prog="train.py", description=__doc__, formatter_class=HelpFormatter,
                           allow_abbrev=False)
    p.add_argument("--data-dir", type=Path, default=nin.DATA_DIR, help="folder holding train/ and val/")
    p.add_argument("--time", type=parse_duration, default=None, metavar="DURATION",
                   help="how long the whole run may take, like 90s, 30m or 1h30m: it measures a few steps here, "
                        "then chooses the recipe and the epochs that fit (other flags given explicitly win; "
                        "not with --epochs, --no-cache or --schedule step)")
    p.add_argument("--epochs", type=int, default=EPOCHS, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                   help=f"images per optimizer step (a --time plan on a CPU takes {CPU_BATCH_SIZE} unless it is given)")
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
    p.add_argument("--image-size", type=int, default=nin.IMAGE_SIZE, help="training and evaluation input side")
    p.add_argument("--start-size", type=int, default=START_SIZE,
                   help=f"progressive resizing: train the first epochs at this side, growing by {SIZE_STEP} px "
                        "in equal stages up to --image-size for the last (0, or a side not below --image-size: off)")
    p.add_argument("--dropout", type=float, default=DROPOUT, help="dropout between mlpconv blocks")
    p.add_argument("--head-width", type=int, default=nin.HEAD_WIDTH,
                   help="width of the last mlpconv block's 3x3 and first 1x1 conv (0: num_classes, the usual "
                        "layout; the paper's ImageNet NiN used 1024)")
    p.add_argument("--mixup", type=float, default=MIXUP, help="mixup alpha (0: off)")
    p.add_argument("--cutmix", type=float, default=CUTMIX,
                   help="CutMix alpha (0: off); with --mixup too, each batch gets one of the two")
    p.add_argument("--unmixed-share", type=float, default=UNMIXED_SHARE,
                   help="train this share of the epochs, the last ones (of a --time plan too), without --mixup and "
                        "--cutmix")
    p.add_argument("--ema", type=float, default=EMA_DECAY,
                   help="decay of an exponential moving average of the weights, which is then validated and "
                        "saved instead of them (0: off); it ramps up as (1+t)/(10+t) over the first steps")
    p.add_argument("--faithful", action="store_true",
                   help="the classic NiN (no batch norm, ReLU on the class maps, dropout 0.5)")
    p.add_argument("--seed", type=int, default=SEED, help="seeds weights, shuffling and augmentation")
    p.add_argument("--device", default=None,
                   help="cuda, cuda:1, mps, cpu (default: cuda, else mps, else cpu; under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="mixed-precision autocast (fp16 adds loss scaling; off: float32). auto: bf16 on MPS (macOS 14 "
                        "on) and on CUDA GPUs of compute capability 8.0 or more, fp16 on 7.x, float32 below; on a CPU, "
                        f"bf16 only if a few timed steps put it at {round(100 * BF16_SHARE)}%% of float32's time or "
                        "less")
    p.add_argument("--per-process-batch", action="store_true",
                   help="under torchrun, --batch-size is per process (global batch = it x processes) "
                        "instead of the global batch split across the processes")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on CUDA, batch-norm statistics over the global batch")
    p.add_argument("--workers", type=int, default=nin.WORKERS,
                   help="threads decoding the cache, or DataLoader processes with --no-cache")
    p.add_argument("--no-cache", action="store_true",
                   help="stream the training photos from disk every epoch instead of decoding them once into memory "
                        "(val/ is still decoded once)")
    p.add_argument("--weights", type=Path, default=nin.WEIGHTS_PATH, help="where the trained weights go")
    p.add_argument("--keep", choices=("best", "last"), default="best",
                   help="which epoch's weights --weights holds: the best on val, or the last (always the last "
                        "when val/ holds no photos)")
    p.add_argument("--class-idx", type=Path, default=nin.CLASS_IDX_PATH, help="where the class map goes")
    p.add_argument("--out-dir", type=Path, default=nin.RUNS_DIR,
                   help="metrics.csv, curves.png, confusion.png and checkpoint.pth go here")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in --out-dir/checkpoint.pth, with its own settings (but this "
                        "command line's --device and --workers, and --amp if given)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = arg_parser()
    args = p.parse_args(argv)
    given = explicit_flags(argv if argv is not None else sys.argv[1:])
    # Every number has a range; inf and nan are outside every one of them.
    checks = [(1 <= args.epochs <= 100_000, "--epochs must be between 1 and 100000"),
              (2 <= args.batch_size <= 65_536, "--batch-size must be between 2 (batch norm needs 2) and 65536"),
              (0 < args.lr <= 10, "--lr must be above 0 and at most 10"),
              (0 <= args.momentum < 1, "--momentum must be in [0, 1)"),
              (0 <= args.weight_decay <= 1, "--weight-decay must be in [0, 1]"),
              (0 <= args.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
              (0 < args.min_crop_scale <= 1, "--min-crop-scale must be in (0, 1]"),
              (nin.MIN_IMAGE_SIZE <= args.image_size <= nin.MAX_IMAGE_SIZE,
               f"--image-size must be between {nin.MIN_IMAGE_SIZE} and {nin.MAX_IMAGE_SIZE}"),
              (args.start_size == 0 or nin.MIN_IMAGE_SIZE <= args.start_size <= nin.MAX_IMAGE_SIZE,
               f"--start-size must be 0 (off) or between {nin.MIN_IMAGE_SIZE} and {nin.MAX_IMAGE_SIZE}"),
              (0 <= args.dropout < 1, "--dropout must be in [0, 1)"),
              (0 <= args.head_width <= nin.MAX_HEAD_WIDTH, f"--head-width must be between 0 and {nin.MAX_HEAD_WIDTH}"),
              (0 <= args.mixup <= 100 and 0 <= args.cutmix <= 100, "--mixup and --cutmix must be between 0 and 100"),
              (0 <= args.unmixed_share < 1, "--unmixed-share must be in [0, 1)"),
              (0 <= args.ema < 1, "--ema must be in [0, 1)"),
              (0 <= args.warmup_epochs <= 100_000, "--warmup-epochs must be between 0 and 100000"),
              (1 <= args.step_epochs <= 100_000, "--step-epochs must be between 1 and 100000"),
              (0 <= args.seed < 2**31, "--seed must be between 0 and 2147483647"),
              (0 <= args.workers <= 256, "--workers must be between 0 and 256"),
              (args.time is None or "epochs" not in given,
               "give --time or --epochs, not both: --time chooses the epochs"),
              (not args.faithful or "dropout" not in given,
               "--faithful has the classic dropout (0.5): not with --dropout"),
              (args.time is None or not args.no_cache, "--time plans from the decode-once cache: not with --no-cache"),
              (args.time is None or args.schedule == "cosine",
               "--time lays a cosine out over the epochs it plans, to 0 at its end: not with --schedule step")]
    for ok, message in checks:
        if not ok:
            p.error(message)
    args.val_every = 1  # validate after every epoch; a --time plan may validate less often
    args.plan_epochs = None  # a --time plan's first epochs, before any re-plan (a record, for the reader)
    return args


def with_settings(args: argparse.Namespace, **settings: object) -> argparse.Namespace:
    """A copy of the arguments with these settings changed: a candidate recipe or plan, args left as they are."""
    return argparse.Namespace(**{**vars(args), **settings})


def explicit_flags(argv: list[str]) -> set[str]:
    """The destinations of the flags written on the command line (not left at their defaults)."""
    written = {token.split("=")[0] for token in argv if token.startswith("--")}
    return {action.dest for action in arg_parser()._actions if written & set(action.option_strings)}


def check_outputs(args: argparse.Namespace) -> None:
    """Everything the run will write can be written: checked before decoding and training, not after."""
    nin.check_output_file(args.weights, "--weights")
    nin.check_output_file(args.class_idx, "--class-idx")
    nin.check_output_folder(args.out_dir, "--out-dir")


def saved_args(args: argparse.Namespace) -> dict:
    """The run's settings as the checkpoint keeps them: paths made absolute, so that --resume from another
    folder finds the same data."""
    return {k: str(v.resolve()) if isinstance(v, Path) else v for k, v in vars(args).items()}


def checkpoint_path(out_dir: Path) -> Path:
    """The file --resume continues from, in a run's --out-dir."""
    return out_dir / "checkpoint.pth"


def resume(args: argparse.Namespace, given: set[str]) -> tuple[argparse.Namespace, dict | None]:
    """With --resume: the run's own settings from its checkpoint (--device and --workers are taken from this
    command line, and --amp when it is given: they belong to the machine), and the checkpoint itself. Without:
    the arguments as they are, and None. Any other flag given with --resume (`given`) must repeat the run's
    setting: a changed one would be silently ignored. A --time run whose budget is spent is refused here,
    before any work."""
    if not args.resume:
        return args, None
    checkpoint = nin.load_torch(checkpoint_path(args.out_dir), "checkpoint")
    if not CHECKPOINT_KEYS <= checkpoint.keys():
        raise nin.CLIError(f"{checkpoint_path(args.out_dir)} is not a checkpoint written by train.py "
                           f"(NiN.pth holds weights only: it cannot be resumed)")
    # Where the checkpoint was found wins over where the run first wrote it (the folder may have moved), and
    # outputs that lived inside that folder move with it.
    here = {"device": args.device, "workers": args.workers, "out_dir": args.out_dir,
            **({"amp": args.amp} if "amp" in given else {})}
    resumed = argparse.Namespace(**{**vars(args), **BEFORE_FLAG_EXISTED, **checkpoint["args"], **here})
    first_out_dir = Path(checkpoint["args"]["out_dir"])
    for name in ("data_dir", "weights", "class_idx"):
        path = Path(getattr(resumed, name))
        if name != "data_dir" and path.is_relative_to(first_out_dir):
            path = args.out_dir / path.relative_to(first_out_dir)
        setattr(resumed, name, path)
    for name in sorted(given - {"resume", *here}):
        value, kept = getattr(args, name), getattr(resumed, name)
        if (Path(value).resolve() != Path(kept).resolve()) if isinstance(kept, Path) else value != kept:
            if name == "time":
                value, kept = format_duration(value), kept and format_duration(kept)
            raise nin.CLIError(f"--resume continues the run in {args.out_dir} with its own settings: "
                               f"--{name.replace('_', '-')} {value} is not its {kept} (to change it, start a new "
                               f"run in another --out-dir)")
    if resumed.time and checkpoint.get("seconds_spent", 0.0) >= resumed.time and checkpoint["epoch"] < resumed.epochs:
        raise nin.CLIError(f"{budget_spent_message(resumed.time)}: nothing more to train")  # before any work
    return resumed, checkpoint


# --------------------------------------------------------------------------------------------- devices


@dataclass
class Run:
    """Where this process trains: its device, its place among torchrun's processes, and mixed precision."""

    device: torch.device
    rank: int
    world: int
    autocast: torch.autocast
    scaler: torch.amp.GradScaler  # only acts for --amp fp16 (float16 gradients underflow without it)

    @property
    def main(self) -> bool:
        """The process that prints and writes files (the only one without torchrun)."""
        return self.rank == 0

    def use_amp(self, amp: str) -> None:
        """Train and validate in this precision from now on: "bf16" or "fp16" autocast, or float32 ("off")."""
        enabled = amp != "off"
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16,
                                       enabled=enabled)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=enabled and amp == "fp16")

    def say(self, text: str, write: Callable[[str], None] = print) -> None:
        if self.main:
            write(text)


def start_run(device_name: str | None) -> Run:
    """The device (--device, or the best one here), in float32 until use_amp; under torchrun (which sets RANK,
    WORLD_SIZE, LOCAL_RANK) this joins the process group: NCCL with one GPU per process, gloo on the CPU."""
    device, rank, world = nin.pick_device(device_name), 0, 1
    if "RANK" in os.environ:
        if device.type == "mps":  # gloo would quietly train on the CPU instead
            raise nin.CLIError("torchrun trains on CUDA GPUs or the CPU, not on Apple's MPS: pass --device cpu")
        use_cuda = device.type == "cuda"  # under torchrun only its type counts: the GPU is the LOCAL_RANK's
        device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        # A crashed process must not leave the others waiting forever in a collective.
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=DIST_TIMEOUT_MINUTES))
        atexit.register(leave_process_group)  # on every way out: the run's end, an error, Ctrl-C
        rank, world = dist.get_rank(), dist.get_world_size()
    # A handful of input shapes per run: cuDNN times its algorithms once per shape and keeps the fastest.
    torch.backends.cudnn.benchmark = True
    return Run(device, rank, world, torch.autocast(device.type, enabled=False),
               torch.amp.GradScaler(device.type, enabled=False))


def check_device_flags(args: argparse.Namespace, run: Run) -> None:
    """Flags this device cannot honour, refused before any photo is read."""
    if args.amp == "fp16" and run.device.type == "cpu":
        raise nin.CLIError("--amp fp16 is for GPUs: on a CPU use bf16 or off")
    if args.amp == "bf16" and run.device.type == "mps" and not mps_has_bf16():  # autocast would turn itself off
        raise nin.CLIError("--amp bf16 on Apple's MPS needs macOS 14 or later: use --amp off here")
    if args.sync_bn and run.world > 1 and run.device.type != "cuda":  # torch's SyncBatchNorm would fail mid-run
        raise nin.CLIError("--sync-bn is for torchrun on CUDA GPUs")


def choose_amp(args: argparse.Namespace, num_classes: int, run: Run) -> str:
    """--amp, with auto made concrete: bf16 on MPS (from macOS 14 on; float32 before, where torch's autocast would
    turn itself off) and on CUDA GPUs from compute capability 8.0 (Ampere) on. Older
    GPUs have no bf16 in hardware (cuDNN has no bf16 convolutions for them): fp16 with loss scaling on those with
    tensor cores (7.x: a V100, a T4), float32 on those without, which gain nothing from fp16 (chosen from what
    the hardware has; not measured here). On a CPU, bf16 where a step in it takes at most
    BF16_SHARE of a float32 step. A CPU with native bf16 (AMX, AVX512-BF16) about halves the step; one without
    emulates bf16 and may well be slower, so it is timed rather than guessed from the CPU's name: first on
    PROBE_BATCH images, which gives emulated bf16 away cheaply, then, unless bf16 was over EMULATED_BF16_STEPS
    times slower there, at the flags' batch. Timed at the full image size and batch of the flags' recipe, before a
    --time plan may choose smaller ones: a CPU that has bf16 has it at every size. Decided per process start, like
    --device: a resumed run may be on another machine. Under torchrun the processes decide on their mean
    timings, so all take the same choice."""
    if args.amp != "auto":
        return args.amp
    if run.device.type == "cuda" and (major := torch.cuda.get_device_capability(run.device)[0]) < 8:
        choice = "fp16" if major >= 7 else "off"
        run.say(f"--amp auto: {PRECISION_NAMES[choice]} on this GPU (compute capability {major}.x; bf16 needs 8.0)")
        return choice
    if run.device.type == "mps" and not mps_has_bf16():
        run.say("--amp auto: float32 on mps (bf16 autocast on MPS needs macOS 14 or later)")
        return "off"
    if run.device.type != "cpu":
        run.say(f"--amp auto: bf16 autocast on {run.device.type}")
        return "bf16"
    probe = with_settings(args, batch_size=PROBE_BATCH, per_process_batch=True)
    probe_share = bf16_share(probe, num_classes, run)
    if probe_share > EMULATED_BF16_STEPS:
        choice = "off"
        took = (f"a bf16 step of {PROBE_BATCH} images took {probe_share:.1f} times as long as a float32 one: bf16 "
                "looks emulated here, not timed further")
    else:
        share = bf16_share(args, num_classes, run)
        choice = "bf16" if share <= BF16_SHARE else "off"
        took = f"a bf16 step took {share:.0%} of a float32 one"
    run.say(f"--amp auto: {PRECISION_NAMES[choice]} on this CPU ({took})")
    return choice


def mps_has_bf16() -> bool:
    """Apple's GPUs compute in bf16 from macOS 14 (Sonoma) on; before it, torch's autocast turns itself off."""
    return torch.backends.mps.is_macos_or_newer(14, 0)


def bf16_share(args: argparse.Namespace, num_classes: int, run: Run) -> float:
    """A training step at the full image size and args' batch in bf16 autocast, as a share of one in float32;
    under torchrun the processes' mean, so that all of them take the same branch of choose_amp (their steps are
    collectives)."""
    off, bf16 = (full_size_step_seconds(args, num_classes, amp, run) for amp in ("off", "bf16"))
    return all_reduce_sum(torch.tensor(bf16 / off, device=run.device)).item() / run.world


def leave_process_group() -> None:
    """Leave torchrun's process group and free what still holds it (DistributedDataParallel sits in reference
    cycles) while Python is still whole. A gloo worker thread still running when the interpreter shuts down
    aborts the process ("terminate called without an active exception", SIGABRT) after the run succeeded."""
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def per_process_batch(args: argparse.Namespace, run: Run) -> int:
    batch_size = args.batch_size if args.per_process_batch else args.batch_size // run.world
    if batch_size < 2:
        raise nin.CLIError(f"--batch-size {args.batch_size} leaves fewer than 2 images per process")
    return batch_size


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------------------------- data


@dataclass
class Data:
    """What main() trains and validates on: the class names, the training batches, and the val photos
    (uint8 images and labels on the device, or None when val/ holds no photos)."""

    classes: list[str]
    training: CachedTraining | StreamedTraining
    val: tuple[torch.Tensor, torch.Tensor] | None

    @property
    def steps(self) -> int:
        return self.training.steps

    def batches(self, epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        return self.training.batches(epoch)


def find_photos(data_dir: Path, run: Run) -> tuple[ImageFolder, ImageFolder | None]:
    """The listings of data_dir/train and data_dir/val (None when val/ holds no photos), checked."""
    train_dir, val_dir = data_dir / "train", data_dir / "val"
    train_set, val_set = find_images(train_dir), find_val_images(val_dir)
    check_same_split(train_set, val_set, train_dir, val_dir)
    if len(train_set.classes) < 2:
        raise nin.CLIError(f"{train_dir} has one class folder: a classifier needs at least two")
    run.say(f"{len(train_set)} training and {len(val_set or [])} validation images, {len(train_set.classes)} "
            f"classes; device {run.device}")
    if val_set is None:
        run.say(f"{val_dir} holds no photos: every labelled photo trains and there is nothing to validate on")
    return train_set, val_set


def training_fingerprints(train_set: ImageFolder, workers: int, run: Run) -> torch.Tensor | None:
    """What NiN.pth lists its training photos by (nin.fingerprints, sorted), so that predict.py can tell when
    it is asked about them; from the first process, the one that writes NiN.pth."""
    return nin.fingerprints([Path(p) for p, _ in train_set.samples], workers).unique() if run.main else None


def load_data(photos: tuple[ImageFolder, ImageFolder | None], data_dir: Path, image_size: int, batch_size: int,
              workers: int, stream: bool, seed: int, run: Run) -> Data:
    """Decode the photos (or set up their streaming) for training at image_size."""
    train_set, val_set = photos
    if run.world > 1:
        run.say(f"{run.world} processes x batch {batch_size} = {run.world * batch_size} images a step")
    cache_dir = None if stream else data_dir / CACHE_FOLDER
    val = None
    if val_set is not None:
        images, labels = decode_once(val_set.samples, nin.eval_tensor, image_size, workers, "val", cache_dir, run)
        warn_unvalidated_classes(val_set.classes, labels, data_dir / "val", run)
        val = images.to(run.device), labels.to(run.device)
    if stream:
        training = StreamedTraining(train_set.samples, image_size, batch_size, workers, seed, run)
    else:
        images, labels = decode_once(train_set.samples, train_tensor, image_size, workers, "train", cache_dir, run)
        if len(labels) < 2:
            raise nin.CLIError(f"{len(labels)} readable training photo: batch norm needs at least two")
        training = CachedTraining(images.to(run.device), labels.to(run.device), batch_size, seed, run)
    return Data(train_set.classes, training, val)


def warn_unvalidated_classes(classes: list[str], labels: torch.Tensor, val_dir: Path, run: Run) -> None:
    """A class may have no readable photo in val/ (split_data.py draws val/ photo by photo, so a class of a few
    photos can get none): training goes on, but the val figures say nothing about it."""
    validated = set(labels.tolist())
    if unseen := [name for i, name in enumerate(classes) if i not in validated]:
        run.say(f"{val_dir} has no photos of {nin.few(unseen)}: validation cannot tell how well they are "
                f"recognised", write=nin.warn)


def make_model(num_classes: int, args: argparse.Namespace) -> nin.NiN:
    return nin.NiN(num_classes, dropout=None if args.faithful else args.dropout, faithful=args.faithful,
                   head_width=args.head_width)


class PhotoFolder(ImageFolder):
    """ImageFolder whose classes leave hidden folders out (.ipynb_checkpoints, ...), as split_data.py and
    predict.py do."""

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        classes = [name for name in super().find_classes(directory)[0] if not nin.is_hidden(name)]
        if not classes:
            raise FileNotFoundError(f"no class folder in {directory}")
        return classes, {name: i for i, name in enumerate(classes)}


def find_images(split_dir: Path, allow_empty: bool = False) -> ImageFolder:
    """The photos of split_dir by class folder, with ImageFolder's errors turned into advice; a class folder
    without photos is one, unless allow_empty."""
    if not split_dir.is_dir():
        raise nin.CLIError(f"{split_dir} not found: run `python split_data.py` first")
    try:
        # The photos nin.image_files lists for predict.py: ImageFolder alone would take hidden subfolders' too.
        return PhotoFolder(split_dir, is_valid_file=functools.partial(nin.is_photo_in, split_dir),
                           allow_empty=allow_empty)
    except OSError as error:  # no class folders, an empty class, a folder we may not read
        raise nin.CLIError(f"{split_dir}: {error}") from None


def find_val_images(val_dir: Path) -> ImageFolder | None:
    """find_images for val/, or None when it holds no photos at all (split_data.py --val-ratio 0). A class
    without photos there is allowed (load_data warns about it, once it knows which photos are readable)."""
    if val_dir.is_dir() and not nin.image_files(val_dir):
        return None
    return find_images(val_dir, allow_empty=True)


def check_same_split(train: ImageFolder, val: ImageFolder | None, train_dir: Path, val_dir: Path) -> None:
    if val is not None and train.classes != val.classes:
        raise nin.CLIError(f"{train_dir} and {val_dir} have different classes: {nin.few(train.classes)} vs "
                           f"{nin.few(val.classes)}")
    ids = [d / nin.SPLIT_ID_FILE for d in (train_dir, val_dir)]
    if all(p.exists() for p in ids) and ids[0].read_text() != ids[1].read_text():
        raise nin.CLIError(f"{train_dir} and {val_dir} come from different runs of split_data.py "
                           f"(it was interrupted?): run it again")


def train_tensor(path: str, image_size: int) -> torch.Tensor:
    """A training photo for the cache: short side resized as for evaluation, centre square kept, uint8.

    The random crops are cut from this square per batch, on the training device.
    """
    side = nin.resize_size(image_size)
    img = nin.load_image(path, side)
    return TF.pil_to_tensor(TF.center_crop(TF.resize(img, side), side))


def decode_once(samples: list[tuple[str, int]], to_tensor: nin.ToTensor, image_size: int, workers: int, desc: str,
                cache_dir: Path | None, run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    """decode_all, through the disk cache in cache_dir (None: no cache). Under torchrun the first process
    decodes and writes the cache; the others then read it."""
    if cache_dir is None:
        return decode_all(samples, to_tensor, image_size, workers, desc)
    if not run.main:
        barrier()
    result = cached_decode(samples, to_tensor, image_size, workers, desc, cache_dir)
    if run.main:
        barrier()
    return result


def decode_all(samples: list[tuple[str, int]], to_tensor: nin.ToTensor, image_size: int, workers: int,
               desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every photo once, skipping unreadable ones with a warning: uint8 images and their labels."""
    images = nin.decode_images([path for path, _ in samples], to_tensor, image_size, workers, desc)
    keep = [i for i, img in enumerate(images) if img is not None]
    if not keep:
        raise nin.CLIError(f"no readable images for {desc}")
    return (torch.stack([images[i] for i in keep]),
            torch.tensor([samples[i][1] for i in keep], dtype=torch.long))


def cache_path(samples: list[tuple[str, int]], to_tensor: nin.ToTensor, image_size: int, desc: str,
               cache_dir: Path) -> Path:
    """Where cached_decode keeps these photos at this size: the name changes when any of them changes."""
    key = hashlib.sha256(f"{to_tensor.__name__}:{image_size}".encode())
    for path, label in samples:
        try:
            st = os.stat(path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:  # a dangling link or a loop: skipped with a warning when decoded
            size = mtime = 0
        key.update(f"{path}:{label}:{size}:{mtime}\n".encode(errors="surrogateescape"))
    return cache_dir / f"{desc}-{image_size}px-{key.hexdigest()[:16]}.pt"


def cached_decode(samples: list[tuple[str, int]], to_tensor: nin.ToTensor, image_size: int, workers: int, desc: str,
                  cache_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """decode_all, remembered in cache_dir under a key made of the file list (names, sizes, times) and size."""
    cache_file = cache_path(samples, to_tensor, image_size, desc, cache_dir)
    if cache_file.is_file():
        try:
            cached = nin.load_torch(cache_file, "cache")
            return cached["images"], cached["labels"]
        except (nin.CLIError, KeyError):
            nin.warn(f"ignored a damaged cache file {cache_file}")
    images, labels = decode_all(samples, to_tensor, image_size, workers, desc)
    try:
        for stale in [*cache_dir.glob(f"{desc}-{image_size}px-*.pt"), *cache_dir.glob(f".{desc}-*.pt.*.tmp")]:
            if stale.suffix == ".pt" or time.time() - stale.stat().st_mtime > nin.STALE_SECONDS:  # a killed run's
                stale.unlink(missing_ok=True)
        nin.save_torch({"images": images, "labels": labels}, cache_file)
    except OSError as error:  # a read-only or full data folder: train all the same, decode again next time
        nin.warn(f"could not keep the decoded photos in {cache_dir} ({error.strerror or error}): training goes on")
    return images, labels


def steps_per_epoch(photos: int, batch_size: int, world: int) -> int:
    """Optimizer steps in an epoch of the cache: the incomplete last batch is dropped."""
    return max(photos // (batch_size * world), 1)


class CachedTraining:
    """The training photos decoded once, on the device: each epoch a fresh shuffle of them, in batches."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, run: Run) -> None:
        self.images, self.labels, self.batch_size, self.seed, self.run = images, labels, batch_size, seed, run
        self.steps = steps_per_epoch(len(labels), batch_size, run.world)

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_order(len(self.labels), self.seed, epoch)
        return batches(self.images, self.labels, self.batch_size, order, self.run.rank, self.run.world)


class StreamedImages(Dataset):
    """--no-cache: the same uint8 tensors as the cache, decoded on the fly in DataLoader workers."""

    def __init__(self, samples: list[tuple[str, int]], image_size: int) -> None:
        self.samples, self.image_size, self.warned = samples, image_size, set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        """The photo and its label, or None (and a warning, once per worker) when it cannot be read."""
        path, label = self.samples[i]
        try:
            return train_tensor(path, self.image_size), label
        except nin.UnreadableImage as error:
            if path not in self.warned:
                nin.warn(f"skipped {error}")
                self.warned.add(path)
            return None


def without_unreadable(batch: list) -> tuple[torch.Tensor, torch.Tensor] | None:
    """DataLoader's collate, leaving out the photos that could not be read; None when fewer than two are left
    (batch norm needs two). Raising here would reach the user wrapped in the worker's traceback."""
    kept = [sample for sample in batch if sample is not None]
    return default_collate(kept) if len(kept) >= 2 else None


class StreamedTraining:
    """--no-cache: the training photos decoded anew every epoch by DataLoader workers."""

    def __init__(self, samples: list[tuple[str, int]], image_size: int, batch_size: int, workers: int, seed: int,
                 run: Run) -> None:
        streamed = StreamedImages(samples, image_size)
        self.sampler = DistributedSampler(streamed, run.world, run.rank, shuffle=True, seed=seed, drop_last=True)
        self.loader = DataLoader(streamed, batch_size, sampler=self.sampler, collate_fn=without_unreadable,
                                 drop_last=len(samples) >= batch_size * run.world, num_workers=workers,
                                 pin_memory=run.device.type == "cuda", persistent_workers=workers > 0)
        self.steps = len(self.loader)

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.set_epoch(epoch)
        for batch in self.loader:
            if batch is None:
                raise nin.CLIError("a training batch held fewer than two readable photos (batch norm needs two): "
                                   "too few photos, or too many unreadable ones (remove them, or train without "
                                   "--no-cache, which skips them before batching)")
            yield batch


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, order: torch.Tensor | None = None,
            rank: int = 0, world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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
        stop = steps_per_epoch(n, batch_size, world) * batch_size * world
    mine = order[:stop][rank::world].to(images.device)
    for start in range(0, len(mine), batch_size):
        idx = mine[start:start + batch_size]
        yield images[idx], labels[idx]


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle of one epoch: the same in every process, and again after --resume."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def training_size(epoch: int, epochs: int, start_size: int, image_size: int) -> int:
    """The side of an epoch's training crops. Progressive resizing cuts the run into equal stages whose sizes
    grow from start_size to image_size by SIZE_STEP: the early epochs, which learn coarse shapes, cost a
    fraction of a full-size one, and the last stage trains at the size that validation and predict.py use,
    so the weights and batch-norm statistics end up tuned to it. A run of fewer epochs than stages skips the
    smallest sizes, so that it too ends at image_size."""
    sizes = stage_sizes(start_size, image_size)[-epochs:]
    return sizes[(epoch - 1) * len(sizes) // epochs]


def stage_sizes(start_size: int, image_size: int) -> list[int]:
    return [*range(start_size or image_size, image_size, SIZE_STEP), image_size]


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


def augment(images: torch.Tensor, labels: torch.Tensor, size: int, min_crop_scale: float,
            mixer: RandomChoice | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of cached uint8 images to the network's training input (cropped to size x size, flipped,
    normalised, maybe mixed) and its targets: the labels, or class probabilities when mixed."""
    x = nin.normalize(random_resized_crop_flip(images, size, min_crop_scale))
    if mixer is not None:
        x, labels = mixer(x, labels)
    return x.contiguous(memory_format=torch.channels_last), labels


# --------------------------------------------------------------------------------------------- the learner


class Learner:
    """The network and everything that changes it: optimizer, learning-rate schedule, batch mixing, weight
    average. `final` is the network that is validated and saved (the weight average, if there is one)."""

    def __init__(self, model: nin.NiN, args: argparse.Namespace, steps_per_epoch: int, run: Run) -> None:
        self.model = model.to(run.device, memory_format=torch.channels_last)
        self.optimizer = make_optimizer(self.model, args.optimizer, args.lr, args.momentum, args.weight_decay)
        self.steps_per_epoch, self.total_steps = steps_per_epoch, args.epochs * steps_per_epoch
        self.warmup_steps = round(args.warmup_epochs * steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(  # stepped once per batch
            self.optimizer, lambda step: lr_factor(step, self.total_steps, args.schedule, self.warmup_steps,
                                                   args.step_epochs * steps_per_epoch))
        self.mixer = make_mixer(args.mixup, args.cutmix, model.num_classes)
        self.unmixed_share = args.unmixed_share
        self.unmixing = False  # once begun, a --time plan that grows does not mix again
        self.ema = make_ema(self.model, args.ema) if args.ema > 0 else None
        self.label_smoothing, self.min_crop_scale, self.run = args.label_smoothing, args.min_crop_scale, run
        # Under torchrun the optimizer steps through a DistributedDataParallel wrapper, which averages the
        # gradients over the processes; on one process it is the model itself.
        self.stepped: torch.nn.Module = self.model
        if run.world > 1:
            if args.sync_bn:
                self.model = self.stepped = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            self.stepped = DistributedDataParallel(self.model, device_ids=[run.device] if run.device.type == "cuda"
                                                   else None)

    @property
    def final(self) -> torch.nn.Module:
        return self.model if self.ema is None else self.ema.module

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self, images: torch.Tensor, labels: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a batch of cached images, take one optimizer step on it, and move the schedule and the
        weight average on; returns the (detached) loss and logits."""
        self.unmixing = self.unmixing or self.scheduler.last_epoch >= self.mixed_steps()
        x, targets = augment(images, labels, size, self.min_crop_scale, None if self.unmixing else self.mixer)
        loss, logits = optimize(self.stepped, self.optimizer, self.run.scaler, x, targets, self.label_smoothing,
                                self.run.autocast)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return loss, logits

    def mixes(self) -> bool:
        """Whether the last step mixed its batch (mixup or CutMix), as every step of its epoch did."""
        return self.mixer is not None and not self.unmixing

    def mixed_steps(self) -> int:
        """The steps before the unmixed end: whole epochs, counted back from the schedule's end, so that a --time
        re-plan moves them with it."""
        return mixed_epochs(self.total_steps // self.steps_per_epoch, self.unmixed_share) * self.steps_per_epoch

    def reschedule(self, epochs: int) -> None:
        """Lay the rest of the learning-rate schedule out again for a run of `epochs` epochs in all (when --time
        re-plans): squeezed or stretched, the cosine still ends at 0 on the last step."""
        self.total_steps = epochs * self.steps_per_epoch
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "ema": None if self.ema is None else self.ema.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])  # with the learning rate of the step it stopped at
        # The rate is a function of the step: only the step count is needed (it reads the scheduler of a
        # checkpoint written before the schedule was one function, too).
        self.scheduler.last_epoch = state["scheduler"]["last_epoch"]
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])


def make_optimizer(model: torch.nn.Module, name: str, lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    # No weight decay on biases and batch-norm parameters: it only fights their scale.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    optimizer = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return optimizer(groups, lr=lr, betas=(momentum, 0.999))


def lr_factor(step: int, total: int, schedule: str, warmup: int, step_every: int) -> float:
    """The learning rate at a step, over --lr. "cosine": a linear warmup over `warmup` steps from 1/warmup
    (at most half the steps: a run shorter than its warmup, such as a --time plan of one epoch, still anneals),
    then half a cosine down to 0 at step `total`; "step": x0.1 every `step_every` steps."""
    if schedule == "step":
        return 0.1 ** (step // step_every)
    warmup = min(warmup, total // 2)
    if step < warmup:
        return 1 / warmup + (1 - 1 / warmup) * step / warmup
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total - warmup) / (total - warmup)))


def mixed_epochs(epochs: int, unmixed_share: float) -> int:
    """How many of a run's epochs, from the first, mix their batches: the rest (--unmixed-share) do not."""
    return epochs - round(unmixed_share * epochs)


def make_mixer(mixup: float, cutmix: float, num_classes: int) -> RandomChoice | None:
    """torchvision's batch-level mixup and/or CutMix (each batch mixed with itself rolled by one), or None."""
    mixers = ([MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []) + \
             ([CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else [])
    return RandomChoice(mixers) if mixers else None


def make_ema(model: torch.nn.Module, decay: float) -> AveragedModel:
    """A moving average of the weights and batch-norm statistics. Its decay ramps up as (1+t)/(10+t) to
    `decay`: a fixed 0.999 would still hold 0.999**2000, 13%, of the random initial weights after 2,000 steps,
    which a short run may not exceed."""
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        t = int(num_averaged)
        get_ema_multi_avg_fn(min(decay, (1 + t) / (10 + t)))(averaged, current, num_averaged)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def optimize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
             x: torch.Tensor, targets: torch.Tensor, label_smoothing: float,
             autocast: torch.autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a ready batch (targets: labels or class probabilities); returns the (detached)
    loss and logits. The scaler only acts for --amp fp16; otherwise it passes through."""
    with autocast:
        logits = model(x)
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), logits.detach()


def train_one_epoch(learner: Learner, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], steps: int, size: int,
                    run: Run, desc: str) -> tuple[float, float]:
    """Loss and accuracy of the epoch's (augmented) training batches, over every process (with mixing, the
    accuracy counts each image's own label, whatever share of it survived the mix)."""
    learner.stepped.train()
    totals = torch.zeros(3, device=run.device)  # loss sum, correct, images
    # disable=None: bars only on a terminal, so a log file holds warnings and epoch lines without carriage returns
    bar = tqdm(batches, total=steps, desc=desc, unit="batch", leave=False, disable=None if run.main else True)
    start = time.perf_counter()
    for step, (images, labels) in enumerate(bar):
        images = images.to(run.device, non_blocking=True)
        labels = labels.to(run.device, non_blocking=True)
        loss, logits = learner.step(images, labels, size)
        # torch.full, not torch.tensor: copying a number to a GPU would wait for it, every step.
        totals += torch.stack([loss * len(labels), (logits.argmax(1) == labels).sum(),
                               torch.full((), len(labels), device=run.device)])
        if step % 10 == 0 and run.main:  # .item() waits for the GPU: not every step
            bar.set_postfix(loss=f"{loss.item():.3f}",
                            img_s=f"{totals[2].item() / (time.perf_counter() - start):.0f}/process")
    loss_sum, correct, seen = all_reduce_sum(totals).tolist()
    if not math.isfinite(loss_sum):  # the weights are lost: stop before they can be saved over good ones
        raise nin.CLIError(f"the training loss became {loss_sum} in {desc.split(' (')[0]}; nothing of that epoch "
                           f"was saved: try a lower --lr")
    return loss_sum / seen, correct / seen


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
             run: Run) -> tuple[float, torch.Tensor]:
    """Validation loss and confusion matrix; under torchrun each process scores a shard, then they are summed."""
    model.eval()
    loss_sum = torch.zeros(1, device=run.device)
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long, device=run.device)
    for x, y in batches(images, labels, VAL_BATCH, rank=run.rank, world=run.world):
        x = nin.normalize(x).contiguous(memory_format=torch.channels_last)
        with run.autocast:
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        cm += nin.confusion_matrix(y, logits.argmax(1), num_classes)
    all_reduce_sum(loss_sum)
    all_reduce_sum(cm)
    return loss_sum.item() / cm.sum().item(), cm.cpu()


# --------------------------------------------------------------------------------------------- the time budget


def parse_duration(text: str) -> float:
    """--time: 90s, 30m, 1h30m, 2h ... in seconds."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text.strip())
    if not match or not any(match.groups()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 30m or 1h30m")
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    total = 3600 * hours + 60 * minutes + seconds
    if total == 0:
        raise argparse.ArgumentTypeError("a duration must be longer than 0 s")
    return float(total)


def format_duration(seconds: float) -> str:
    """Whole seconds up to 90 s, minutes and seconds up to an hour, hours and whole minutes from there: a --time
    budget under an hour reads back as the seconds it was given."""
    seconds = round(seconds)
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min" + (f" {seconds % 60} s" if seconds % 60 else "")
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min"


def format_estimate(seconds: float) -> str:
    """A predicted duration, with no more precision than a prediction has: whole minutes from 10 minutes."""
    return "about " + format_duration(seconds if seconds < 600 else 60 * round(seconds / 60))


def budget_spent_message(limit: float) -> str:
    """The start of the one-line error of a --resume that has no time left to train in."""
    return f"this run's --time {format_duration(limit)} is spent"


def validates(epoch: int, epochs: int, every: int) -> bool:
    """Whether an epoch is followed by validation: every `every`-th, and always the last few."""
    return epoch % every == 0 or epoch > epochs - VAL_LAST_EPOCHS


def validation_schedule(epochs: int, every: int) -> str:
    """Which epochs validates() picks, in words."""
    if every == 1 or epochs <= VAL_LAST_EPOCHS:
        return "every epoch"
    if every > epochs - VAL_LAST_EPOCHS:
        return f"the last {VAL_LAST_EPOCHS} epochs"
    return f"every {every} epochs and the last {VAL_LAST_EPOCHS}"


@dataclass
class Pace:
    """Seconds per training step at each training size, and per validation pass, measured on this machine."""

    step: dict[int, float]
    val: float

    def seconds(self, args: argparse.Namespace, steps: int, first_epoch: int = 1) -> float:
        """What epochs first_epoch..args.epochs of this run should take, validation included."""
        return sum(self.training(args, steps, epoch) + (self.val if validates(epoch, args.epochs, args.val_every)
                                                           else 0.0) for epoch in range(first_epoch, args.epochs + 1))

    def training(self, args: argparse.Namespace, steps: int, epoch: int) -> float:
        """What the training part of one epoch should take."""
        return steps * self.step[training_size(epoch, args.epochs, args.start_size, args.image_size)]


def measure_pace(args: argparse.Namespace, num_classes: int, steps: int, val_photos: int, run: Run) -> Pace:
    """A few timed steps of a throwaway network on random images at each training size the run may have (a
    --time plan's re-plans included), and one timed validation batch. The random-number streams are put back
    afterwards, so the run is the same as without the measurement."""
    batch = per_process_batch(args, run)
    sizes = stage_sizes(args.start_size, args.image_size)[-most_epochs(args):]
    with random_numbers_put_back(run.device):
        learner = Learner(make_model(num_classes, args), args, steps, run)
        side = nin.resize_size(args.image_size)
        images = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, device=run.device)
        labels = torch.randint(0, num_classes, (batch,), device=run.device)
        step = {size: timed(lambda size=size: learner.step(images, labels, size), run) for size in sizes}
        if val_photos == 0:
            return Pace(step, 0.0)
        n = min(val_photos, VAL_BATCH)
        val_images = torch.randint(0, 256, (n, 3, args.image_size, args.image_size), dtype=torch.uint8,
                                   device=run.device)
        batch_seconds = timed(lambda: evaluate(learner.final, val_images, labels[:1].expand(n), num_classes, run),
                              run)
    return Pace(step, batch_seconds * val_photos / n)


def full_size_step_seconds(args: argparse.Namespace, num_classes: int, amp: str, run: Run) -> float:
    """Seconds per training step at the run's full image size in this precision (for --amp auto)."""
    trial = replace(run)
    trial.use_amp(amp)
    full_size_only = with_settings(args, start_size=0)
    return measure_pace(full_size_only, num_classes, 1, 0, trial).step[args.image_size]


def timed(work: Callable[[], object], run: Run) -> float:
    """Seconds per call of work(), over TIMED_STEPS calls after a first one that pays the one-off costs."""
    def sync() -> None:
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)

    work()
    sync()
    start = time.perf_counter()
    for _ in range(TIMED_STEPS):
        work()
    sync()
    return (time.perf_counter() - start) / TIMED_STEPS


def plan_for_budget(args: argparse.Namespace, explicit: set[str], photos: tuple[ImageFolder, ImageFolder | None],
                    clock: Clock, run: Run) -> tuple[argparse.Namespace, Pace]:
    """The settings that fill --time here: the default recipe with as many epochs as fit (at most its own; on
    a CPU at batch CPU_BATCH_SIZE), or, while neither MIN_DEFAULT_EPOCHS of it nor all the short recipe's epochs
    fit, the short recipe with as many epochs as fit. Flags given on the command line are kept in both. Decoding
    is estimated from a sample of photos. Flags that set everything the short recipe changes leave one candidate,
    planned alone. The short recipe is timed first, and the default one at all its sizes only where it may get the
    budget (plan_candidate). Under torchrun every process times what the others time, and the first one's choice
    is everyone's."""
    if run.device.type == "cpu" and "batch_size" not in explicit:
        args = with_settings(args, batch_size=CPU_BATCH_SIZE)
    short = {k: v for k, v in SHORT_RECIPE.items() if k not in explicit}
    if not short:  # the flags leave the short recipe nothing to change: never measured twice, nor called short
        name, plans = "your flags' recipe", {"your flags' recipe": plan_candidate(args, photos, clock, run)}
    else:  # the short recipe first: whether all its epochs fit decides how much of the default one to measure
        short_plan = plan_candidate(with_settings(args, **short), photos, clock, run)
        whole = torch.tensor(int(short_plan.epochs() == EPOCHS), device=run.device)
        short_fits_whole = bool(all_reduce_min(whole).item())  # the same in every process: they measure alike
        default_plan = plan_candidate(args, photos, clock, run, at_least=0 if short_fits_whole else MIN_DEFAULT_EPOCHS)
        default_wins = default_plan.fitted is not None and (
            short_fits_whole or default_plan.epochs() >= MIN_DEFAULT_EPOCHS)
        name = "the default recipe" if default_wins else "the short recipe"
        plans = {"the default recipe": default_plan, "the short recipe": short_plan}
    chosen = plans[name]
    # fitted again in the time left now: the other recipe was timed since (the choice stands: a few seconds move
    # it only where both are close)
    fitted = fit_epochs(chosen.settings, chosen.pace, chosen.steps, clock.for_training(args.time, chosen.decoding),
                        args.time)
    if fitted is None:
        one_epoch = chosen.steps * min(chosen.pace.step.values()) + chosen.pace.val
        raise nin.CLIError(f"--time {format_duration(args.time)} is too short here: starting and timing this "
                           f"machine took {format_duration(clock.spent())}, decoding takes "
                           f"{format_estimate(chosen.decoding)} and one epoch {format_estimate(one_epoch)}")
    if dist.is_initialized():  # the processes' clocks differ a little: the first one's plan is everyone's
        choice = [(name, fitted.epochs, fitted.val_every)]
        dist.broadcast_object_list(choice, src=0)
        name, epochs, every = choice[0]
        chosen = plans[name]
        fitted = with_settings(chosen.settings, epochs=epochs, val_every=every)
    fitted.plan_epochs = fitted.epochs
    run.say(f"--time {format_duration(args.time)}: {name}, {fitted.epochs} "
            f"epoch{'' if fitted.epochs == 1 else 's'} at "
            f"{', '.join(map(str, sorted(set(chosen.pace.step))))} px, batch {fitted.batch_size}, validating "
            f"{validation_schedule(fitted.epochs, fitted.val_every)} ({format_estimate(chosen.decoding)} to decode "
            "first)")
    if name == "the short recipe":  # why not the default one: what a longer budget or a faster machine buys
        most = plans["the default recipe"].epochs()
        run.say(f"  (at most {most} epoch{'' if most == 1 else 's'} of the default recipe fit{'s' if most == 1 else ''}"
                f" here; it gets the budget from {MIN_DEFAULT_EPOCHS})")
    return fitted, chosen.pace


@dataclass
class Candidate:
    """A recipe planned for the budget: its measured pace and its steps per epoch, the decoding it needs first,
    and the most epochs of it that fit (None: not even one). Where a lower bound on its epochs' time already shows
    that fewer than plan_candidate's `at_least` fit, `fitted` is None, `pace` holds the smallest size's step only,
    and `bound` the most epochs that bound allows."""

    settings: argparse.Namespace
    pace: Pace
    steps: int
    decoding: float
    fitted: argparse.Namespace | None
    bound: int | None = None

    def epochs(self) -> int:
        """The most epochs that fit: the plan's, or the bound's."""
        return self.bound if self.bound is not None else self.fitted.epochs if self.fitted else 0


def plan_candidate(args: argparse.Namespace, photos: tuple[ImageFolder, ImageFolder | None], clock: Clock,
                   run: Run, at_least: int = 0) -> Candidate:
    """The most epochs of these settings that fit in what is left of --time, from timed steps at each training
    size. With `at_least`, a few steps at the smallest size come first, and where even that many epochs of them
    would not fit, the other sizes go untimed: on a slow CPU, timing the default recipe's large images takes a
    good part of a short budget, to learn only that the recipe does not get it. Under torchrun the processes
    agree on that, from the fastest of them."""
    train_set, val_set = photos
    num_classes = len(train_set.classes)
    candidate = with_settings(args, epochs=EPOCHS)
    steps = steps_per_epoch(len(train_set), per_process_batch(candidate, run), run.world)
    decoding = estimate_decoding(train_set, val_set, candidate)
    if at_least:
        smallest = min(stage_sizes(candidate.start_size, candidate.image_size)[-most_epochs(candidate):])
        probe = measure_pace(with_settings(candidate, image_size=smallest, start_size=0), num_classes, steps, 0, run)
        bound = max(int(clock.for_training(args.time, decoding) // (steps * probe.step[smallest])), 0)
        bound = -int(all_reduce_min(torch.tensor(-bound, device=run.device)).item())  # the largest of them
        if bound < at_least:
            return Candidate(candidate, probe, steps, decoding, None, bound)
    pace = measure_pace(candidate, num_classes, steps, len(val_set or []), run)
    available = clock.for_training(args.time, decoding)
    return Candidate(candidate, pace, steps, decoding, fit_epochs(candidate, pace, steps, available, args.time))


def fit_epochs(candidate: argparse.Namespace, pace: Pace, steps: int, available: float,
               budget: float) -> argparse.Namespace | None:
    """The candidate with the most epochs (up to EPOCHS) whose training and validation fit in `available`
    seconds, validating as often as VAL_SHARE of the budget allows; None if not even one epoch fits."""
    fitted = None
    for epochs in range(1, EPOCHS + 1):
        every = max(1, math.ceil(epochs * pace.val / (VAL_SHARE * budget)))
        trial = with_settings(candidate, epochs=epochs, val_every=every)
        if pace.seconds(trial, steps) > available:
            break
        fitted = trial
    return fitted


def estimate_decoding(train_set: ImageFolder, val_set: ImageFolder | None, args: argparse.Namespace) -> float:
    """Seconds to decode the photos for these settings: nothing much when train.py's cache holds them already,
    else timed on a sample."""
    cache_dir = args.data_dir / CACHE_FOLDER
    sets = [(train_set.samples, train_tensor, "train"), *([(val_set.samples, nin.eval_tensor, "val")] if val_set
                                                          else [])]
    if all(cache_path(samples, to_tensor, args.image_size, desc, cache_dir).is_file() for samples, to_tensor, desc
           in sets):
        return 0.0
    sample = train_set.samples[:: max(len(train_set) // 16, 1)][:16]
    start = time.perf_counter()
    nin.decode_images([path for path, _ in sample], train_tensor, args.image_size, args.workers, "timing",
                      progress=False)
    per_photo = (time.perf_counter() - start) / len(sample)
    return per_photo * (len(train_set) + len(val_set or []))


def most_epochs(args: argparse.Namespace) -> int:
    """The most epochs a run may have: its own, or under --time the recipe's EPOCHS, which a plan made while the
    machine was slow may grow to once it runs faster."""
    return EPOCHS if args.time else args.epochs


def most_epochs_within(seconds: float, pace: Pace, args: argparse.Namespace, steps: int, epoch: int,
                       slowdown: float) -> int:
    """The most epochs in all, from `epoch` up to most_epochs(args), whose epochs after `epoch` take at most
    `seconds` at `slowdown` times the measured pace, validation included."""
    for epochs in range(most_epochs(args), epoch, -1):
        plan = with_settings(args, epochs=epochs)
        if slowdown * pace.seconds(plan, steps, epoch + 1) <= seconds:
            return epochs
    return epoch


class Clock:
    """The run's wall time: since this process started, plus earlier runs of the same training (--resume);
    the prediction made before the first epoch, what saving takes, and the --time limit."""

    def __init__(self) -> None:
        self.started, self.spent_before = time.monotonic(), 0.0
        self.predicted: float | None = None  # stays None when a finished run is resumed
        self.predicted_epochs = 0  # the epochs the prediction was for: a --time run may re-plan after it
        self.slowness: list[float] = []  # each epoch's training time over the measured pace's
        self.replan_told_at = -math.inf
        # How long the last save that drew the figures took, as the final one does (only the first process saves:
        # the others keep 0, and epochs_that_fit takes the smallest plan of all); and the seconds spent saving
        # since the first save ended, which the measured pace leaves out.
        self.drawing_save = 0.0
        self.saving = 0.0
        self.saving_since: float | None = None

    def spent(self) -> float:
        return self.spent_before + time.monotonic() - self.started

    def for_training(self, budget: float, decoding: float) -> float:
        """What a plan may spend on its epochs from now: its share of --time, less what is spent and the decoding."""
        return PLAN_SHARE * budget - self.spent() - decoding

    def saved(self, seconds: float, drew: bool) -> None:
        """A save after an epoch took `seconds`, the figures drawn too if `drew`."""
        if drew:
            self.drawing_save = seconds
        if self.saving_since is None:  # the first save draws the figures whatever the time: not the usual rate
            self.saving_since = self.spent()
        else:
            self.saving += seconds

    def saving_share(self) -> float:
        """The share of the time since the first save that went to saving. Saves come at most every SAVE_SECONDS
        and draw at most every FIGURE_SECONDS, so with short epochs their cost follows the time more than the
        epochs; where an epoch is longer than both, every epoch saves and draws."""
        elapsed = 0.0 if self.saving_since is None else self.spent() - self.saving_since
        return self.saving / elapsed if elapsed > 0 else 0.0

    def predict(self, pace: Pace, args: argparse.Namespace, steps: int, done_epochs: int, run: Run) -> None:
        """Print what the whole run should take, from the measured pace. Under --time, refuse to start an epoch
        that would end past the limit: a resumed run may have spent what was left of it timing this machine."""
        if args.time is not None:
            left = args.time - self.spent()
            one_more = pace.seconds(with_settings(args, epochs=done_epochs + 1), steps, done_epochs + 1)
            # each process measured its own pace: one verdict for all, from the tightest of them
            if all_reduce_min(torch.tensor(left - one_more, device=run.device)).item() < 0:
                raise nin.CLIError(f"{budget_spent_message(args.time)}: {format_duration(max(left, 0.0))} left "
                                   f"after timing this machine and loading the photos, and one more epoch takes "
                                   f"{format_estimate(one_more)}")
        self.predicted = self.spent() + pace.seconds(args, steps, done_epochs + 1)
        self.predicted_epochs = args.epochs
        hint = ""
        if args.no_cache:  # the timed steps train on images already decoded: streaming adds what they do not see
            hint = ", plus the decoding --no-cache repeats every epoch"
        elif args.time is None and self.predicted > 3600:
            hint = "; `--time 30m` trains the best model that fits in 30 minutes"
        within = "" if args.time is None else f" of the {format_duration(args.time)} allowed"
        run.say(f"this run should take {format_estimate(self.predicted)}{within} here{hint}")

    def epochs_that_fit(self, pace: Pace, args: argparse.Namespace, steps: int, epoch: int, train_seconds: float,
                        run: Run) -> int:
        """--time, after each epoch: how many epochs the run can have in all and still end within the limit, at
        the pace of its last epochs (the machine may be slower or faster than measured, or change its pace for
        a while). Fewer while the plan no longer fits (the caller lays the learning-rate schedule and the
        training sizes out again for them), and more, up to the recipe's EPOCHS, as far as the time left
        allows while the machine runs faster; `epoch` when not even one more epoch fits. Re-planning
        rather than stopping at the limit keeps what makes the end of a run good: the learning rate annealed
        to 0 and the last epochs at the full image size. The saves between epochs take their share of the time
        left, and the save after the last epoch (it draws the figures), which a short budget must leave free,
        what the last drawing save took. The same answer in every process."""
        if args.time is None:
            return args.epochs
        self.slowness.append(train_seconds / pace.training(args, steps, epoch))
        # A process's first epoch pays one-off costs: the measured pace stands until the next epochs say more.
        # The paces below include the saves, as the time left must, and so does the pace the message tells.
        with_saves = 1 / (1 - self.saving_share())
        recent = [slowness * with_saves for slowness in self.slowness[1:][-3:]] or [1.0]
        slowdown = statistics.median(recent)
        done = self.spent() + slowdown * pace.val + self.drawing_save  # this epoch may be validated; the run ends saved
        # A plan shrinks when it no longer ends within half the slack it was planned with (the other half
        # absorbs noise), and grows only as far as it fits within the plan's own share: between the two, timing
        # noise does not move it. It grows only on three recent paces, at the slowest of them: growing is a
        # choice, and where an epoch is a large share of the budget, a plan grown in a fast moment (or on the
        # small images of its first stage) may find no epoch left to shrink in before its end, and stop with its
        # schedule unfinished.
        loose = most_epochs_within((1 + PLAN_SHARE) / 2 * args.time - done, pace, args, steps, epoch, slowdown)
        if loose == epoch < args.epochs:  # near the end: one last epoch, if it ends within the limit itself, makes
            # a shorter plan with its schedule finished, where stopping now would leave the learning rate above 0.
            # No slack is left for noise there, so that epoch has to fit at the slowest of the recent paces.
            loose = min(most_epochs_within(args.time - done, pace, args, steps, epoch, max(recent)), epoch + 1)
        fits = min(loose, args.epochs)
        if loose >= args.epochs and len(self.slowness[1:]) >= 3:
            fits = max(fits, most_epochs_within(PLAN_SHARE * args.time - done, pace, args, steps, epoch, max(recent)))
        fits = int(all_reduce_min(torch.tensor(fits, device=run.device)).item())
        if fits == epoch < args.epochs:
            run.say(f"stopping after epoch {epoch} of {args.epochs}: another epoch would end past --time "
                    f"{format_duration(args.time)} at this pace", write=tqdm.write)
        elif fits != args.epochs and self.spent() - self.replan_told_at >= REPLAN_NOTE_SECONDS:
            self.replan_told_at = self.spent()
            run.say(f"at {1 / slowdown:.0%} of the measured pace: {fits} epochs in all instead of {args.epochs}, "
                    f"to {'end within' if fits < args.epochs else 'fill'} --time {format_duration(args.time)} "
                    f"(the learning rate and the training sizes laid out again for them)", write=tqdm.write)
        return fits

    def report(self, args: argparse.Namespace) -> str:
        spent = self.spent()
        limit = "" if args.time is None else f"; --time {format_duration(args.time)}"
        if self.predicted is None:
            return f"took {format_duration(spent)}{limit}"
        replanned = ("" if args.epochs == self.predicted_epochs else
                     f" for the {self.predicted_epochs} epochs planned then, {args.epochs} after re-planning")
        return (f"took {format_duration(spent)}, predicted {format_estimate(self.predicted)}{replanned} "
                f"({100 * (spent / self.predicted - 1):+.0f} %){limit}")


# --------------------------------------------------------------------------------------------- records


@dataclass
class Progress:
    """The run so far: a row per epoch (metrics.csv), and the best epoch on val with its confusion matrix."""

    history: list[dict] = field(default_factory=list)
    best_acc: float = 0.0
    best_cm: torch.Tensor | None = None

    @property
    def epoch(self) -> int:
        return self.history[-1]["epoch"] if self.history else 0

    @classmethod
    def from_checkpoint(cls, checkpoint: dict, args: argparse.Namespace) -> Progress:
        # Each epoch's training size and mixing; a checkpoint from before those columns gets them from its settings,
        # and its epochs' plans, which a --time run may have changed since, as unknown.
        mixes = args.mixup > 0 or args.cutmix > 0
        last_mixed = mixed_epochs(args.epochs, args.unmixed_share)
        history = [{"size": training_size(h["epoch"], args.epochs, args.start_size, args.image_size),
                    "mixed": int(mixes and h["epoch"] <= last_mixed), "planned_epochs": "", **h}
                   for h in checkpoint["history"]]
        return cls(history, checkpoint["best_acc"], checkpoint["best_confusion"])

    def record(self, epoch: int, train_loss: float, train_acc: float, val_loss: float | None,
               val_cm: torch.Tensor | None, lr: float, size: int, seconds: float, *, mixed: bool,
               planned: int) -> bool:
        """Add the epoch's row, with the epochs the run plans in all after it (--time may re-plan); whether it is
        the best on val so far (the same in every process: val_cm is summed over them). Compared as metrics.csv
        holds it (4 digits), so that the best epoch kept here is the one best_validated finds there: the first of
        equal accuracies."""
        val_acc = None if val_cm is None else round(val_cm.diag().sum().item() / val_cm.sum().item(), 4)
        self.history.append({"epoch": epoch, "train_loss": round(train_loss, 4), "train_acc": round(train_acc, 4),
                             "val_loss": "" if val_loss is None else round(val_loss, 4),
                             "val_acc": "" if val_acc is None else val_acc, "lr": f"{lr:.3g}",
                             "size": size, "seconds": round(seconds, 1), "mixed": int(mixed),
                             "planned_epochs": planned})
        improved = val_acc is not None and (self.best_cm is None or val_acc > self.best_acc)
        if improved:
            self.best_acc, self.best_cm = val_acc, val_cm
        return improved

    def line(self, improved: bool) -> str:
        """The last epoch as one line of the log (* marks a new best on val)."""
        h = self.history[-1]
        val = ("no val" if h["val_acc"] == "" else
               f"val loss {h['val_loss']:.4f} acc {h['val_acc']:.4f}{' *' if improved else '  '}")
        unmixed = "  unmixed" if unmixed_epochs(self.history) and not int(h["mixed"]) else ""
        return (f"epoch {h['epoch']:3d}/{h['planned_epochs']}  train loss {h['train_loss']:.4f} "
                f"acc {h['train_acc']:.4f}  {val}  lr {h['lr']}  {h['size']} px  {h['seconds']:.1f}s{unmixed}")


def unmixed_epochs(history: list[dict]) -> list[int]:
    """The epochs that trained on whole photos after others had mixed them (--unmixed-share): none in a run that
    never mixes."""
    if not any(int(h["mixed"]) for h in history):
        return []
    return [h["epoch"] for h in history if not int(h["mixed"])]


def validated_epochs(history: list[dict]) -> list[dict]:
    """The rows of metrics.csv whose epoch was validated: --time may skip some epochs' validation."""
    return [h for h in history if h["val_acc"] != ""]


def best_validated(history: list[dict]) -> dict | None:
    """The first epoch with the highest val accuracy (a row of metrics.csv), None if none was validated."""
    validated = validated_epochs(history)
    return max(validated, key=lambda h: float(h["val_acc"])) if validated else None


class Saver:
    """Writes what a run leaves behind from the first process: after the last epoch, and after any other once
    SAVE_SECONDS have passed since the last save. The checkpoint first (it is what --resume continues from,
    and it holds the kept weights too), then NiN.pth and class_idx.json, the figures, and metrics.csv last,
    so a kill between any two leaves files that a resumed run puts right."""

    def __init__(self, args: argparse.Namespace, classes: list[str], keep_last: bool, saved_epoch: int,
                 trained_on: torch.Tensor | None, clock: Clock, run: Run) -> None:
        self.args, self.classes, self.keep_last, self.clock, self.run = args, classes, keep_last, clock, run
        self.trained_on = trained_on
        self.checkpoint = checkpoint_path(args.out_dir)
        self.saved_epoch, self.saved_at, self.drawn_at = saved_epoch, -math.inf, -math.inf
        self.best: dict | None = None  # the best epoch's weights (--keep best), on the CPU

    def resume(self, checkpoint: dict, learner: Learner) -> None:
        """Take the kept weights from the checkpoint, and write NiN.pth from them: a kill may have fallen
        between the two files. A calibration stored in NiN.pth since (predict.py --calibrate) is kept."""
        self.best = checkpoint.get("best_model")
        if self.run.main and (self.keep_last or self.best is not None):
            calibration = None
            if self.args.weights.is_file():
                with contextlib.suppress(nin.CLIError):
                    stored = nin.load_torch(self.args.weights, "weights").get("calibration")
                    calibration = nin.stored_calibration(stored, self.args.weights)
            self.write_weights(learner, calibration)

    def after_epoch(self, learner: Learner, progress: Progress, improved: bool, last: bool) -> None:
        if not self.run.main:
            return
        if improved and not self.keep_last:
            self.best = {k: v.detach().to("cpu", copy=True) for k, v in learner.final.state_dict().items()}
        if not last and time.monotonic() - self.saved_at < SAVE_SECONDS:
            return
        nin.pyplot_for_files()  # imported on the first draw: not a cost that the last save pays again
        started = time.monotonic()
        nin.save_torch({**learner.state_dict(), "epoch": progress.epoch, "best_acc": progress.best_acc,
                        "best_confusion": progress.best_cm, "best_model": self.best, "history": progress.history,
                        "classes": self.classes, "seconds_spent": self.clock.spent(),
                        "predicted_seconds": self.clock.predicted, "rng": rng_state(self.run.device),
                        "args": saved_args(self.args)},
                       self.checkpoint)
        self.write_weights(learner)
        self.saved_epoch, self.saved_at = progress.epoch, time.monotonic()
        first = self.drawn_at == -math.inf  # it times the drawing, which the plan keeps time for at the end
        draws = last or first or (self.saved_at - self.drawn_at > FIGURE_SECONDS and not self.near_the_limit())
        if draws:
            save_curves(progress, self.args.out_dir / "curves.png")
            if progress.best_cm is not None:
                best_epoch = best_validated(progress.history)["epoch"]
                nin.save_confusion_matrix(progress.best_cm, self.classes, self.args.out_dir / "confusion.png",
                                          f"val, best epoch {best_epoch}: {progress.best_acc:.1%}")
            self.drawn_at = time.monotonic()
        nin.save_csv(progress.history, self.args.out_dir / "metrics.csv")  # last: a complete row = a saved epoch
        self.clock.saved(time.monotonic() - started, draws)

    def near_the_limit(self) -> bool:
        """Whether a --time run is in its last FIGURE_SECONDS, where it redraws no figures until its last save
        (which draws them anyway). The plan keeps time for that save only: in a budget under a minute, the
        redrawing due FIGURE_SECONDS after the first save fell just before the last one, and the run ended past
        its limit."""
        return self.args.time is not None and self.clock.spent() > self.args.time - FIGURE_SECONDS

    def write_weights(self, learner: Learner, calibration: nin.Calibration | None = None) -> None:
        """NiN.pth: the last epoch's weights (--keep last) or the best epoch's; then class_idx.json, which
        changes only with them: a run that fails before its first save leaves the old pair as it was."""
        model = learner.final
        if not self.keep_last:
            if self.best is None:  # resumed from a checkpoint that does not hold them: NiN.pth stays as it is
                return
            model = copy.deepcopy(learner.final).cpu()
            model.load_state_dict(self.best)
        nin.save_weights(model, self.classes, self.args.image_size, self.args.weights, calibration, self.trained_on)
        nin.save_class_names(self.classes, self.args.class_idx)


def rng_state(device: torch.device) -> dict:
    """The random-number state of this process: the CPU's, and the training device's where it has its own
    (the crops and the mixing are drawn there)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "mps": torch.mps.get_rng_state() if device.type == "mps" else None}


def put_rng_state(state: dict, device: torch.device) -> None:
    """Draw on from a state of rng_state: the CPU's, and the device's where it was saved on that kind of device
    (a run resumed on another kind starts that device's stream afresh)."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    if device.type == "mps" and state.get("mps") is not None:
        torch.mps.set_rng_state(state["mps"])


@contextlib.contextmanager
def random_numbers_put_back(device: torch.device) -> Iterator[None]:
    """What runs inside leaves the random numbers as it found them, on the CPU and on the device."""
    state = rng_state(device)
    try:
        yield
    finally:
        put_rng_state(state, device)


def continue_random_numbers(state: dict | None, seed: int, epoch: int, run: Run) -> None:
    """Continue the random numbers of a checkpoint, so that a resumed run draws what the whole run would have.
    Only the first process saves its state, so under torchrun every process starts afresh from its seed and the
    epoch instead."""
    if state is None or run.world > 1:
        torch.manual_seed(seed * 100_003 + epoch * 101 + run.rank)
        return
    put_rng_state(state, run.device)


@contextlib.contextmanager
def resume_hint_on_ctrl_c(saver: Saver, out_dir: Path) -> Iterator[None]:
    """Turns Ctrl-C into a one-line message that says how to resume."""
    try:
        yield
    except KeyboardInterrupt:
        if saver.saved_epoch == 0:
            raise nin.CLIError("interrupted during the first epoch: nothing to resume yet") from None
        command = "python train.py --resume" + ("" if out_dir == nin.RUNS_DIR else
                                                f" --out-dir {shlex.quote(str(out_dir))}")
        raise nin.CLIError(f"interrupted; epoch {saver.saved_epoch} is saved in {saver.checkpoint}: "
                           f"`{command}` finishes the run") from None


def summary(progress: Progress, classes: list[str], keep_last: bool, weights: Path) -> str:
    """The end-of-run report: the best epoch's scores, and the last epoch's accuracy beside the best one (the
    best was chosen on these same photos, so it reads high), naming the epoch whose weights were saved."""
    last = progress.history[-1]
    best = best_validated(progress.history)
    if best is None:
        return f"\nno validation photos: {weights.name} holds the last epoch's weights (epoch {last['epoch']})"
    held = f"the last epoch's (epoch {last['epoch']})" if keep_last else f"the best epoch's (epoch {best['epoch']})"
    return (f"\nbest epoch on val:\n{nin.classification_report(progress.best_cm, classes)}\n"
            f"val accuracy: last epoch {last['val_acc']:.4f}, best epoch {best['val_acc']:.4f} (epoch {best['epoch']}; "
            f"chosen on these photos, so it reads high); {weights.name} holds {held} weights")


def save_curves(progress: Progress, path: Path) -> None:
    """Loss, accuracy, learning rate and training size by epoch, as one PNG."""
    plt = nin.pyplot_for_files()
    from matplotlib.ticker import MaxNLocator

    history = progress.history
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax, lr_ax) = plt.subplots(1, 3, figsize=(14, 3.8))
    best = best_validated(history)
    validated = best is not None
    for split, style in (("train", "-"), ("val", "o-"))[:1 + validated]:
        for ax, column in ((loss_ax, f"{split}_loss"), (acc_ax, f"{split}_acc")):
            shown = [(h["epoch"], h[column]) for h in history if h[column] != ""]  # epochs without validation
            ax.plot(*zip(*shown, strict=True), style, markersize=3, label=split)
    if validated:
        acc_ax.axhline(best["val_acc"], color="grey", linestyle=":", linewidth=1)
        last = validated_epochs(history)[-1]
        acc_ax.set_title(f"accuracy (best val {best['val_acc']:.1%}, epoch {best['epoch']}; "
                         f"last {last['val_acc']:.1%})")
    else:
        acc_ax.set_title("accuracy (no validation photos)")
    loss_ax.set_title("loss (train: on augmented batches)")
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
    unmixed = unmixed_epochs(history)
    if unmixed:  # the train curves jump where mixing stops: whole photos are easier to fit than mixed ones
        for ax in (loss_ax, acc_ax):
            ax.axvspan(unmixed[0] - 0.5, unmixed[-1] + 0.5, color="tab:orange", alpha=0.12,
                       label="unmixed" if ax is acc_ax else None)
    for ax in (loss_ax, acc_ax, lr_ax):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no "epoch 1.5" ticks on short runs
        ax.grid(alpha=0.3)
    loss_ax.legend()
    acc_ax.legend()
    fig.tight_layout()
    nin.save_figure(fig, path)


if __name__ == "__main__":
    nin.run_cli(main)
