#!/usr/bin/env bash
# One short lease of a GPU machine, as one script (the third lease behind bench/RESULTS.md; the script of the
# first, sweeps A and B, is in git history: `git show 214a79b:bench/gpu_session.sh`):
#   bash bench/gpu_session.sh DATA_DIR OUT_DIR [SECONDS]
# DATA_DIR is made by bench/gpu_data.py: training photos as the squares train.py caches, val photos untouched.
# 1. the default candidates' seed 0 alone, one after the other: the whole-run wall times;
# 2. bench/throughput.py, the classic pipeline reading original photos (the val photos, each listed 10 times);
# 3. the sweep: CPU-route candidates (float32, as on a CPU) and default candidates, 3 seeds each, 8 at a time,
#    reusing the runs of step 1;
# 4. the best default candidate's three NiN.pth, the tables and every run's metrics.csv and log into OUT_DIR.
# Stops itself SECONDS (default 560) after it starts. (The lease of RESULTS.md's sweep D ran it with a cap of 75 s
# on each run of step 1, which cut both before their end; 150 s is meant to let them finish.)
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

CPU="--head-width 512 --mixup 0 --cutmix 0 --amp off"  # the CPU route: no mixing in short runs; float32
CONFIGS=(
  d90=""                                      # today's default: 160 px, 90 epochs, head 512, mixup/CutMix
  d120p112="--epochs 120 --start-size 112"    # 30 epochs each at 112, 128, 144, 160 px: about d90's cost
  c112="--image-size 112 --epochs 36 $CPU"    # the CPU route so far (29.6 min on CPU-2)
  c112p80="--image-size 112 --start-size 80 --epochs 44 $CPU"
  c128p80="--image-size 128 --start-size 80 --epochs 38 $CPU"
  c128p64="--image-size 128 --start-size 64 --epochs 42 $CPU"
  c112p64="--image-size 112 --start-size 64 --epochs 50 $CPU"
  d120="--epochs 120"                         # last: cut first if time runs short
)

phase "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cudnn', torch.backends.cudnn.version())"
nproc

phase "default candidates alone, seed 0 (wall time of the whole run, start-up and decoding included)"
for config in "${CONFIGS[@]:0:2}"; do
  capped 150 python3 bench/sweep.py --data-dir "$DATA" --runs-dir $RUNS/sweep --csv "$OUT/solo.csv" --seeds 0 "$config"
  name=${config%%=*}
  python3 -c "
import csv, statistics, sys
h = list(csv.DictReader(open(sys.argv[1])))
s = [float(r['seconds']) for r in h]
print(f'{sys.argv[2]}: first epoch {s[0]:.2f} s, median epoch {statistics.median(s):.2f} s, epochs sum {sum(s):.1f} s')
" $RUNS/sweep/$name-s0/metrics.csv $name
done

phase "throughput: model only vs project vs classic (cuda, batch 64, defaults; original photos)"
rm -rf /tmp/orig && for d in "$DATA"/val/*/; do
  c=$(basename "$d"); mkdir -p /tmp/orig/train/$c
  for f in "$d"*; do for i in 0 1 2 3 4 5 6 7 8 9; do ln -s "$(realpath "$f")" "/tmp/orig/train/$c/$i-$(basename "$f")"; done; done
done
capped 90 python3 bench/throughput.py --data-dir /tmp/orig --device cuda --steps 200 --warmup 20 --workers 16

phase "sweep: 3 seeds each, 8 runs at a time"
capped 600 python3 bench/sweep.py --data-dir "$DATA" --runs-dir $RUNS/sweep --csv "$OUT/sweep.csv" --parallel 8 \
  "${CONFIGS[@]}"

phase "the best default candidate's weights"
if [[ -f "$OUT/sweep.csv" ]]; then
  BEST=$(python3 -c "
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r['name'].startswith('d') and r['seeds'] == '3']
print(max(rows, key=lambda r: float(r['best_mean']))['name'] if rows else '')" "$OUT/sweep.csv")
  echo "best: ${BEST:-none with 3 seeds}"
  for s in 0 1 2; do [[ -n "$BEST" ]] && cp "$RUNS/sweep/$BEST-s$s/NiN.pth" "$OUT/NiN-$BEST-s$s.pth"; done
  cat "$OUT/sweep.csv"
fi
tar czf "$OUT/runs.tgz" $(find $RUNS -name metrics.csv -o -name done.txt -o -name log.txt) 2>/dev/null
echo "done at t=$((SECONDS - START)) s"
