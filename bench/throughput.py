"""Training throughput (images/s): the model alone, this project's input pipeline, and the classic one.

    python bench/throughput.py                      # CPU or GPU, whichever train.py would pick
    python bench/throughput.py --device cuda --batch-size 256

Same model, batch size, image size and optimizer step in all three, measured one after the other in one run:
- model-only: synthetic tensors already on the device (the ceiling for any input pipeline);
- project: train.py's decode-once uint8 cache on the device, crops, flips and mixup/CutMix per batch on the
  device (train.py's defaults);
- classic: ImageFolder + per-sample PIL RandomResizedCrop/flip/ToTensor/Normalize + DataLoader workers.
Needs data/train (python split_data.py). The one-off decoding of the cache is timed separately.

Then three settings that a CPU might want, each against the plain one in the same run:
- the model-only training step at each thread count of --threads (torch's default is one per core);
- the model-only training step in float32 and in bf16 autocast (on a CPU, train.py's `--amp auto` times these
  two and takes bf16 where it clearly pays; the three pipelines above run in bf16 on CUDA, in float32 elsewhere);
- evaluation (validation and predict.py's forward pass): the network as it is, and with each batch norm
  folded into the convolution before it (torch.fx's `fuse`; training cannot fold them, its batch statistics
  change every step).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch.fx.experimental.optimization import fuse
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import ImageFolder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's modules
sys.path.insert(0, str(Path(__file__).resolve().parent))  # cv.py, beside this file
import cv
import nin
import train


def parse_args() -> argparse.Namespace:
    p = nin.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=nin.DATA_DIR, help="folder holding train/ (default: %(default)s)")
    p.add_argument("--device", default=None, help="cuda, mps, cpu (default: cuda, else mps, else cpu)")
    p.add_argument("--image-size", type=int, default=nin.IMAGE_SIZE, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=train.BATCH_SIZE, help="default: %(default)s")
    p.add_argument("--steps", type=int, default=20, help="timed steps per pipeline (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    p.add_argument("--workers", type=int, default=nin.WORKERS,
                   help="decoding threads / classic DataLoader workers (default: %(default)s)")
    p.add_argument("--threads", type=cv.whole_numbers, default=sorted({1, torch.get_num_threads()}),
                   help="thread counts to time the model-only step at, comma-separated (default: 1 and torch's "
                        "own, %(default)s)")
    args = p.parse_args()
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--workers", args.workers)):
        if value < 1:
            p.error(f"{flag} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be at least 0")
    if min(args.threads) < 1:
        p.error("--threads must each be at least 1")
    if not nin.MIN_IMAGE_SIZE <= args.image_size <= nin.MAX_IMAGE_SIZE:
        p.error(f"--image-size must be between {nin.MIN_IMAGE_SIZE} and {nin.MAX_IMAGE_SIZE}")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                      step: Callable[[torch.Tensor, torch.Tensor], object], batch_size: int, warmup: int, steps: int,
                      device: torch.device) -> float:
    """Run warmup + steps batches through step(images, labels); time the last `steps`, input included."""
    batches = iter(batches)
    for images, labels in itertools.islice(batches, warmup):
        step(images, labels)
    sync(device)
    start = time.perf_counter()
    for images, labels in itertools.islice(batches, steps):
        step(images, labels)
    sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def forever(make_iterable: Callable[[], Iterable]) -> Iterator:
    while True:
        yield from make_iterable()


def main() -> None:
    args = parse_args()
    device = nin.pick_device(args.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    train_set = train.find_images(args.data_dir / "train")
    model = nin.NiN(len(train_set.classes))  # train.py's default network
    model = model.to(device, memory_format=torch.channels_last).train()
    optimizer = train.make_optimizer(model, "sgd", train.LR, train.MOMENTUM, train.WEIGHT_DECAY)
    bs, size = args.batch_size, args.image_size
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device {device} ({name}), batch {bs}, {size} px, {len(train_set)} training photos")

    scaler = torch.amp.GradScaler(device.type, enabled=False)

    def step(x: torch.Tensor, labels: torch.Tensor, precision: torch.autocast = autocast) -> None:
        train.optimize(model, optimizer, scaler, x, labels, train.LABEL_SMOOTHING, precision)

    # 1. model only
    x = torch.randn(bs, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, len(train_set.classes), (bs,), device=device)
    model_only = images_per_second(itertools.repeat((x, y)), step, bs, args.warmup, args.steps, device)
    print(f"model only        {model_only:8.1f} img/s")

    # 2. this project's pipeline (decode time excluded: once per run, and cached on disk after that)
    start = time.perf_counter()
    images, labels = train.decode_all(train_set.samples, train.train_tensor, size, args.workers, "decode")
    decode_s = time.perf_counter() - start
    images, labels = images.to(device), labels.to(device)

    mixer = train.make_mixer(train.MIXUP, train.CUTMIX, len(train_set.classes))

    def project_step(images: torch.Tensor, labels: torch.Tensor) -> None:
        step(*train.augment(images, labels, size, train.MIN_CROP_SCALE, mixer))

    shuffled = forever(lambda: train.batches(images, labels, bs, torch.randperm(len(labels))))
    project = images_per_second(shuffled, project_step, bs, args.warmup, args.steps, device)
    print(f"project pipeline  {project:8.1f} img/s   (+ {decode_s:.1f} s once to decode "
          f"{len(labels)} photos with {args.workers} threads)")

    # 3. the classic per-sample pipeline
    classic_tf = transforms.Compose([transforms.RandomResizedCrop(size, scale=(train.MIN_CROP_SCALE, 1)),
                                     transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                     transforms.Normalize(nin.MEAN, nin.STD)])
    loader = DataLoader(ImageFolder(args.data_dir / "train", classic_tf), bs, shuffle=True, drop_last=True,
                        num_workers=args.workers, pin_memory=device.type == "cuda",
                        persistent_workers=args.workers > 0)

    def classic_step(x: torch.Tensor, labels: torch.Tensor) -> None:
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        step(x, labels.to(device, non_blocking=True))

    classic = images_per_second(forever(lambda: loader), classic_step, bs, args.warmup, args.steps, device)
    print(f"classic pipeline  {classic:8.1f} img/s   ({args.workers} DataLoader workers)")
    print(f"project / model-only = {project / model_only:.1%}   project / classic = {project / classic:.2f}x")

    # 4. threads, for the model-only training step
    default_threads = torch.get_num_threads()
    for threads in args.threads:
        torch.set_num_threads(threads)
        rate = images_per_second(itertools.repeat((x, y)), step, bs, args.warmup, args.steps, device)
        print(f"model only, {threads:2d} threads {rate:8.1f} img/s")
    torch.set_num_threads(default_threads)

    # 5. precision, for the model-only training step
    for name, enabled in (("float32", False), ("bf16 autocast", True)):
        precision = torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
        rate = images_per_second(itertools.repeat((x, y)), lambda x, y, precision=precision: step(x, y, precision),
                                 bs, args.warmup, args.steps, device)
        print(f"model only, {name:<13} {rate:8.1f} img/s")

    # 6. evaluation, with and without the batch norms folded into the convolutions
    model.eval()
    folded = fuse(model)
    with torch.no_grad():
        difference = (model(x) - folded(x)).abs().max().item()
        for name, network in (("as it is", model), ("batch norm folded", folded)):
            rate = images_per_second(itertools.repeat((x, y)), lambda x, _, network=network: network(x), bs,
                                     args.warmup, args.steps, device)
            print(f"evaluation, {name:<17} {rate:8.1f} img/s")
    print(f"largest logit difference, folded or not: {difference:.1e}")


if __name__ == "__main__":
    nin.run_cli(main)
