#!/usr/bin/env bash
# The first GPU lease behind bench/RESULTS.md (sweeps A and B, the single-GPU and torchrun timings), as one
# script for one short lease of a GPU machine:
#   bash bench/gpu_session.sh DATA_DIR OUT_DIR [SECONDS]
# 1. bench/throughput.py on the GPU;  2. sweep A (3 seeds: candidate defaults and CPU-route candidates);
# 3. the best candidate default alone, with plain python and with 1-process torchrun (its timings), then a
# torchrun --sync-bn --amp fp16 check;  4. sweep B (2 seeds, one change at a time) with whatever time is left.
# Stops itself SECONDS (default 560) after it starts; OUT_DIR gets the log, the sweep tables, every run's
# metrics.csv (metrics.tgz) and the best candidate's weights for each seed.
# Its configurations change the defaults of the day it ran (RESULTS.md, section 1: "base" was 128 px,
# 60 epochs, no mixing, the narrow last block); that lease also timed a --compile flag, since removed.
set -u
DATA=${1:?DATA_DIR}; OUT=${2:?OUT_DIR}; BUDGET=${3:-560}
START=$SECONDS
RUNS=runs/gpu
mkdir -p "$OUT" "$RUNS"
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=60  # progress bars would flood the log
exec > >(tee -a "$OUT/log.txt") 2>&1

left() { echo $((BUDGET - (SECONDS - START))); }
phase() { echo; echo "=== $1 (t=$((SECONDS - START)) s)"; }
capped() { local cap=$1; shift; local t; t=$(left); ((t > cap)) && t=$cap; ((t > 5)) && timeout "$t" "$@"; }

phase "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
nproc

phase "throughput: model only vs project vs classic (cuda, batch 64, 128 px)"
capped 90 python3 bench/throughput.py --data-dir "$DATA" --device cuda --steps 200 --warmup 20 --workers 16

phase "sweep A: 3 seeds"
capped 240 python3 bench/sweep.py --data-dir "$DATA" --runs-dir $RUNS/A --csv "$OUT/sweepA.csv" --parallel 8 \
  base= \
  big="--head-width 512 --image-size 160 --epochs 120" \
  bigmix="--head-width 512 --image-size 160 --epochs 120 --mixup 0.2 --cutmix 1.0" \
  cpu112="--image-size 112 --epochs 36 --amp off" \
  cpu112w="--image-size 112 --epochs 36 --head-width 512 --amp off" \
  cpu96w="--image-size 96 --epochs 48 --head-width 512 --amp off"

BEST=base; FLAGS=""
if [[ -f "$OUT/sweepA.csv" ]]; then
  read -r BEST FLAGS < <(python3 -c "
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if not r['name'].startswith('cpu')]
best = max(rows, key=lambda r: float(r['best_mean']))
print(best['name'], best['flags'])" "$OUT/sweepA.csv")
fi
for s in 0 1 2; do cp "$RUNS/A/$BEST-s$s/NiN.pth" "$OUT/NiN-$BEST-s$s.pth" 2>/dev/null; done

phase "best candidate '$BEST' ($FLAGS) alone: python train.py"
capped 100 /usr/bin/time -f "wall %e s" python3 train.py --data-dir "$DATA" $FLAGS --out-dir $RUNS/solo \
  --weights $RUNS/solo/NiN.pth --class-idx $RUNS/solo/class_idx.json

phase "the same under torchrun --nproc_per_node=1"
capped 100 /usr/bin/time -f "wall %e s" python3 -m torch.distributed.run --nproc_per_node=1 train.py \
  --data-dir "$DATA" $FLAGS --out-dir $RUNS/torchrun --weights $RUNS/torchrun/NiN.pth \
  --class-idx $RUNS/torchrun/class_idx.json

phase "torchrun --nproc_per_node=1 --sync-bn --amp fp16, 3 epochs"
capped 45 python3 -m torch.distributed.run --nproc_per_node=1 train.py --data-dir "$DATA" $FLAGS --epochs 3 \
  --sync-bn --amp fp16 --out-dir $RUNS/fp16 --weights $RUNS/fp16/NiN.pth --class-idx $RUNS/fp16/class_idx.json

phase "sweep B: 2 seeds, one change at a time from the defaults"
capped 400 python3 bench/sweep.py --data-dir "$DATA" --runs-dir $RUNS/B --csv "$OUT/sweepB.csv" --parallel 8 \
  --seeds 0,1 \
  wide512="--head-width 512" \
  size160="--image-size 160" \
  epochs120="--epochs 120" \
  mix="--mixup 0.2 --cutmix 1.0" \
  ema="--ema 0.999" \
  dropout="--dropout 0.2" \
  wide128="--head-width 128" \
  seedrecipe="--epochs 30" \
  faithful="--faithful"

phase "summary"
for d in solo torchrun fp16; do
  [[ -f $RUNS/$d/metrics.csv ]] && echo "$d: $(python3 -c "
import csv, statistics, sys
h = list(csv.DictReader(open(sys.argv[1])))
s = [float(r['seconds']) for r in h]
print(f'{len(h)} epochs, best val {max(float(r[\"val_acc\"]) for r in h):.4f}, last {h[-1][\"val_acc\"]}, '
      f'first epoch {s[0]:.2f} s, median epoch {statistics.median(s):.2f} s, sum {sum(s):.1f} s')" $RUNS/$d/metrics.csv)"
done
for t in A B; do [[ -f "$OUT/sweep$t.csv" ]] && { echo "sweep $t:"; cat "$OUT/sweep$t.csv"; }; done
tar czf "$OUT/metrics.tgz" $(find $RUNS -name metrics.csv -o -name done.txt) 2>/dev/null
echo "done at t=$((SECONDS - START)) s"
