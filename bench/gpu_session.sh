#!/usr/bin/env bash
# For maintainers with a borrowed GPU machine (15 minutes of it, start-up included): every GPU measurement the
# open work needs, as one script. The scripts of earlier leases are in git history (`git log -p bench/gpu_session.sh`).
#
# Here, first:  python bench/gpu_data.py ../shared/data/flower_photos .gpu/flower_squares   (carried: under run's 64 MiB)
# There:        bash bench/gpu_session.sh .gpu/flower_squares "$OUT" [SECONDS]
#
# 1. 5-fold cross-validation of the default recipe (`python train.py`), the 5 folds at once on the one GPU;
# 2. at the same time, the weights to ship: the default recipe on every photo (split_data.py --val-ratio 0);
# 3. the new NiN.pth calibrated on the cross-validation's out-of-fold predictions;
# 4. `python train.py --time 60s` on the default split of the squares: what a minute buys on a GPU, and how far
#    the run's predicted wall time is from the actual one;
# 5. the tables, logs and the new NiN.pth into OUT. Stops itself SECONDS (default 540) after it starts.
# Then, here: python predict.py test_img/*.jpg --weights OUT/NiN.pth --class-idx OUT/class_idx.json
set -u
DATA=${1:?SQUARES_DIR}; OUT=${2:?OUT_DIR}; BUDGET=${3:-540}
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

phase "the default recipe on every photo (in the background), and its 5-fold cross-validation"
ALL=$RUNS/all
(T0=$SECONDS
 python3 split_data.py --source "$DATA" --val-ratio 0 --out $ALL/data > $ALL.log 2>&1 &&
 timeout $(( $(left) - 20 )) python3 train.py --data-dir $ALL/data --out-dir $ALL/run --weights "$OUT/NiN.pth" \
   --class-idx "$OUT/class_idx.json" >> $ALL.log 2>&1
 echo "all photos: exit $?, wall $((SECONDS - T0)) s" >> $ALL.log) &
timeout $(( $(left) - 20 )) python3 bench/cv.py --source "$DATA" --folds 5 --parallel 5 --out $RUNS/cv-default
wait

phase "calibrate the new weights on the cross-validation's out-of-fold predictions"
python3 predict.py --calibrate $RUNS/cv-default/oof_predictions.csv --weights "$OUT/NiN.pth" \
  --class-idx "$OUT/class_idx.json"

phase "python train.py --time 60s (default split of the squares)"
T0=$SECONDS
python3 split_data.py --source "$DATA" --out $RUNS/split > /dev/null 2>&1
timeout $(( $(left) - 15 )) python3 train.py --time 60s --data-dir $RUNS/split --out-dir $RUNS/time60 \
  --weights $RUNS/time60/NiN.pth --class-idx $RUNS/time60/class_idx.json > $RUNS/time60.log 2>&1
echo "exit $?, wall $((SECONDS - T0)) s (the split included)"
tr '\r' '\n' < $RUNS/time60.log | grep -v 'batch/s' | grep -v '^epoch ' | tail -n 14
cp $RUNS/time60/metrics.csv "$OUT/time60-metrics.csv" 2>/dev/null

phase "results"
tr '\r' '\n' < $ALL.log | grep -v 'batch/s' | tail -n 8
cp -r $RUNS/cv-default "$OUT/cv-default" 2>/dev/null
rm -rf "$OUT"/cv-default/fold-*/{data,NiN.pth,run/checkpoint.pth}  # the gallery is drawn already; keep OUT small
cp $ALL/run/metrics.csv "$OUT/all-metrics.csv" 2>/dev/null
echo "done at t=$((SECONDS - START)) s"
