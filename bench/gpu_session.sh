#!/usr/bin/env bash
# For maintainers with a borrowed GPU machine (15 minutes of it, start-up included): every GPU measurement the
# open work needs, as one script. The scripts of earlier leases are in git history (`git log -p bench/gpu_session.sh`).
#
# Here, first:  python bench/gpu_data.py ../shared/data/flower_photos .gpu/flower_squares   (carried: under run's 64 MiB)
# There:        bash bench/gpu_session.sh .gpu/flower_squares "$OUT" [SECONDS]
#
# 1. `python train.py --time 60s` on the default split of the squares: what a minute buys on a GPU, and how far
#    the run's predicted wall time is from the actual one (issue: --time);
# 2. 5-fold cross-validation of the default recipe without mixup and CutMix, all five runs at once on the one
#    GPU: does one temperature then calibrate to an ECE of 2 % or less, and what does it cost in accuracy? (issue:
#    calibration; mixup without CutMix, measured on a CPU, calibrated no better and cost accuracy: RESULTS.md, the
#    entry "Does one temperature calibrate to 2 % with mixup alone?");
# 3. the tables and logs into OUT. Stops itself SECONDS (default 540) after it starts.
set -u
DATA=${1:?SQUARES_DIR}; OUT=${2:?OUT_DIR}; BUDGET=${3:-540}
(( BUDGET >= 240 )) || { echo "SECONDS: at least 240 (a minute of --time, then the cross-validations)"; exit 2; }
START=$SECONDS
RUNS=runs/gpu
mkdir -p "$OUT" "$RUNS"
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=60  # progress bars would flood the log
exec > >(tee -a "$OUT/log.txt") 2>&1

left() { echo $((BUDGET - (SECONDS - START))); }
phase() { echo; echo "=== $1 (t=$((SECONDS - START)) s)"; }

phase "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
nproc

phase "python train.py --time 60s (default split of the squares)"
T0=$SECONDS
python3 split_data.py --source "$DATA" --out $RUNS/split > $RUNS/time60.log 2>&1
timeout $(( $(left) - 15 )) python3 train.py --time 60s --data-dir $RUNS/split --out-dir $RUNS/time60 \
  --weights $RUNS/time60/NiN.pth --class-idx $RUNS/time60/class_idx.json >> $RUNS/time60.log 2>&1
echo "exit $?, wall $((SECONDS - T0)) s (the split included)"
tr '\r' '\n' < $RUNS/time60.log | grep -v 'batch/s' | grep -v '^epoch ' | tail -n 20
cp $RUNS/time60.log "$OUT/"; cp $RUNS/time60/metrics.csv "$OUT/time60-metrics.csv" 2>/dev/null

phase "5-fold cross-validation without mixup and CutMix"
timeout $(( $(left) - 20 )) python3 bench/cv.py --source "$DATA" --folds 5 --parallel 5 --out $RUNS/cv-plain \
  -- --mixup 0 --cutmix 0 > $RUNS/cv-plain.log 2>&1

phase "results"
rm -rf $RUNS/cv-plain/fold-*/{data,NiN.pth,run/checkpoint.pth}  # OUT gets the tables, logs and pictures, not these
tail -n 12 $RUNS/cv-plain.log
cp -r $RUNS/cv-plain $RUNS/cv-plain.log "$OUT/" 2>/dev/null
echo "done at t=$((SECONDS - START)) s"
