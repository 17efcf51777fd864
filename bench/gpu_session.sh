#!/usr/bin/env bash
# One short lease of a GPU machine, as one script (the scripts of the earlier leases behind bench/RESULTS.md are in
# git history: sweeps A and B `git show 214a79b:bench/gpu_session.sh`, sweep D `git show 7d22ba0:bench/gpu_session.sh`):
#   bash bench/gpu_session.sh DATA_DIR OUT_DIR [SECONDS]
# DATA_DIR is made by bench/gpu_data.py: training photos as the squares train.py caches, val photos untouched.
# 1. `python train.py` alone with the defaults, timed by the shell: the whole run's wall time on one GPU;
# 2. the sweep: CPU-route candidates (float32, as on a CPU) around the command of RESULTS.md section 3,
#    3 seeds each, 12 at a time;
# 3. bench/throughput.py, the classic pipeline reading original photos (the val photos, each listed 10 times);
# 4. the tables and every run's metrics.csv and log into OUT_DIR.
# Stops itself SECONDS (default 555) after it starts.
set -u
DATA=${1:?DATA_DIR}; OUT=${2:?OUT_DIR}; BUDGET=${3:-555}
START=$SECONDS
RUNS=runs/gpu
mkdir -p "$OUT" "$RUNS"
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=60  # progress bars would flood the log
exec > >(tee -a "$OUT/log.txt") 2>&1

left() { echo $((BUDGET - (SECONDS - START))); }
phase() { echo; echo "=== $1 (t=$((SECONDS - START)) s)"; }
capped() { local cap=$1; shift; local t; t=$(left); ((t > cap)) && t=$cap; ((t > 5)) && timeout "$t" "$@"; }

# The CPU route (ls2wd10), the steps that led to it and changes around it, as measured on CPU-2 in
# bench/RESULTS.md section 3: to see how far float32 GPU runs track CPU-2's and whether a change beats it.
ROUTE="--image-size 112 --start-size 80 --epochs 42 --batch-size 32 --head-width 512 --mixup 0 --cutmix 0 --amp off"
CONFIGS=(
  r42="$ROUTE"
  ls2="$ROUTE --label-smoothing 0.2"
  wd10="$ROUTE --weight-decay 1e-3"
  ls2wd10="$ROUTE --label-smoothing 0.2 --weight-decay 1e-3"  # the CPU route
  ls2wd20="$ROUTE --label-smoothing 0.2 --weight-decay 2e-3"
  ls2wd10h1024="$ROUTE --label-smoothing 0.2 --weight-decay 1e-3 --head-width 1024 --epochs 40"  # ~5 % more multiply-adds per image (counted, not timed)
)

phase "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cudnn', torch.backends.cudnn.version())"
nproc

phase "python train.py alone, the defaults, seed 0 (start-up and decoding included)"
SOLO=$RUNS/solo
T0=$SECONDS
capped 150 python3 train.py --data-dir "$DATA" --out-dir $SOLO --weights $SOLO/NiN.pth --class-idx $SOLO/class_idx.json \
  > $SOLO.log 2>&1
echo "exit $?, wall $((SECONDS - T0)) s"
tr '\r' '\n' < $SOLO.log | grep -v 'batch/s' | tail -n 12  # the log's last lines, without progress bars
python3 -c "
import csv, statistics, sys
h = list(csv.DictReader(open(sys.argv[1])))
s = [float(r['seconds']) for r in h]
print(f'{len(h)} epochs: first {s[0]:.2f} s, median {statistics.median(s):.2f} s, sum {sum(s):.1f} s; '
      f'best val {max(float(r[\"val_acc\"]) for r in h):.4f}')
" $SOLO/metrics.csv

phase "sweep: CPU-route candidates, 3 seeds each, 12 runs at a time"
capped 300 python3 bench/sweep.py --data-dir "$DATA" --runs-dir $RUNS/sweep --csv "$OUT/sweep.csv" --parallel 12 \
  "${CONFIGS[@]}"

phase "throughput: model only vs project vs classic (cuda, batch 64, defaults; original photos)"
rm -rf /tmp/orig && for d in "$DATA"/val/*/; do
  c=$(basename "$d"); mkdir -p /tmp/orig/train/$c
  for f in "$d"*; do for i in 0 1 2 3 4 5 6 7 8 9; do ln -s "$(realpath "$f")" "/tmp/orig/train/$c/$i-$(basename "$f")"; done; done
done
capped 90 python3 bench/throughput.py --data-dir /tmp/orig --device cuda --steps 200 --warmup 20 --workers 16

phase "results"
[[ -f "$OUT/sweep.csv" ]] && cat "$OUT/sweep.csv"
cp $SOLO.log "$OUT/solo.log"
tar czf "$OUT/runs.tgz" $(find $RUNS -name metrics.csv -o -name done.txt -o -name log.txt) 2>/dev/null
echo "done at t=$((SECONDS - START)) s"
