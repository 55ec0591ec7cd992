#!/usr/bin/env bash
# Reproduce docs/results_sparse.md: dense against sparsified (sparse variational dropout,
# --sparsify) models on JSB Chorales and on the generated caption scenes; train, evaluate,
# export (pruned graphs for sparse runs), tabulate, and time the step graphs.
# Runs two trainings at a time (one thread each); a run whose summary.json exists is skipped.
#   bash bench/results_sparse.sh [music|caption|all]   (default all; OUT=runs/sparse_results)
set -uo pipefail
cd "$(dirname "$0")/.."
BB=.venv/bin/bbservice
PY=.venv/bin/python
OUT=${OUT:-runs/sparse_results}
export OMP_NUM_THREADS=1
mkdir -p "$OUT/eval" "$OUT/exports"
train() {  # kind name args...
  local kind=$1 name=$2; shift 2
  [ -f "$OUT/$name/summary.json" ] && { echo "skip $name (done)"; return; }
  echo "start $name"
  $BB train "$kind" --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1 \
    && echo "done $name" || echo "FAILED $name (see $OUT/$name.log)"
}
export_run() {  # kind name: the pruned graph for a sparse checkpoint, the usual one otherwise
  [ -f "$OUT/exports/$2/manifest.json" ] || $BB export "$1" "$OUT/$2" --out "$OUT/exports/$2" \
    --no-store --no-checkpoint > "$OUT/exports/$2.json" 2>"$OUT/exports/$2.log" \
    || echo "FAILED export $2 (see $OUT/exports/$2.log)"
}
WHAT=${1:-all}

if [ "$WHAT" = music ] || [ "$WHAT" = all ]; then
  MUSIC="--data jsb --epochs 25 --device cpu"
  SPARSE="--sparsify --sparse-kl-warmup 5"
  train music jsb_lstm_dense --gate lstm $MUSIC & train music jsb_bbeta5_dense --gate bbeta5 $MUSIC & wait
  for w in 0.1 0.3 1; do
    train music jsb_lstm_w$w --gate lstm $MUSIC $SPARSE --sparse-kl-weight $w &
    train music jsb_bbeta5_w$w --gate bbeta5 $MUSIC $SPARSE --sparse-kl-weight $w & wait
  done
  LR10="--sparse-kl-weight 1 --sparse-lr-scale 10"  # variational parameters at 10x the lr
  train music jsb_lstm_w1lr10 --gate lstm $MUSIC $SPARSE $LR10 &
  train music jsb_bbeta5_w1lr10 --gate bbeta5 $MUSIC $SPARSE $LR10 & wait
  for run in "$OUT"/jsb_*/; do export_run music "$(basename "$run")"; done
fi

if [ "$WHAT" = caption ] || [ "$WHAT" = all ]; then
  SCENES="$OUT/scenes64/dataset_scenes.json"
  [ -f "$SCENES" ] || $BB generate scenes --out "$OUT/scenes64" --n-train 4000 --n-val 200 \
    --n-test 300 --n-holdout 300 --image-size 64 --holdout red:triangle,blue:circle,green:square \
    --seed 0 > /dev/null
  CAP="--data $SCENES --max-train-images 3000 --encoder resnet18 --encoder-stages 3 --fine-tune \
    --image-size 64 --grid 4 --embed-dim 64 --attention-dim 128 --dropout 0.3 --batch-size 32 \
    --lr 1e-3 --encoder-lr 1e-3 --seed 1 --no-progress"
  SPARSE="--sparsify --sparse-kl-weight 1 --sparse-kl-warmup 3"
  train caption cap_lstm_e10_dense --gate lstm --hidden 256 --epochs 10 $CAP &
  train caption cap_lstm_e10_w1 --gate lstm --hidden 256 --epochs 10 $CAP $SPARSE & wait
  train caption cap_bbeta5_e10_dense --gate bbeta5 --hidden 183 --epochs 10 $CAP &
  train caption cap_bbeta5_e10_w1 --gate bbeta5 --hidden 183 --epochs 10 $CAP $SPARSE & wait
  train caption cap_bbeta5_e20_dense --gate bbeta5 --hidden 183 --epochs 20 $CAP &
  train caption cap_bbeta5_e20_w1 --gate bbeta5 --hidden 183 --epochs 20 $CAP $SPARSE & wait
  train caption cap_bbeta5_e20_w1lr10 --gate bbeta5 --hidden 183 --epochs 20 $CAP $SPARSE \
    --sparse-lr-scale 10
  for run in "$OUT"/cap_*/; do
    name=$(basename "$run")
    [ -f "$OUT/eval/${name}_test_b1.json" ] || $BB eval caption --checkpoint "$run" \
      --data "$SCENES" --split test --beam 1 --no-progress --out "$OUT/eval/${name}_test_b1.json" \
      > "$OUT/eval/$name.txt"
    export_run caption "$name"
  done
fi

$PY bench/results_sparse_table.py "$OUT" | tee "$OUT/table.md"
for pair in "jsb_lstm_dense jsb_lstm_w0.1 jsb_lstm_w0.3 jsb_lstm_w1 jsb_lstm_w1lr10" \
            "jsb_bbeta5_dense jsb_bbeta5_w0.1 jsb_bbeta5_w0.3 jsb_bbeta5_w1 jsb_bbeta5_w1lr10" \
            "cap_bbeta5_e20_dense cap_bbeta5_e20_w1 cap_bbeta5_e20_w1lr10 cap_bbeta5_e10_w1 cap_lstm_e10_dense cap_lstm_e10_w1"; do
  folders=()
  for name in $pair; do
    [ -f "$OUT/exports/$name/manifest.json" ] && folders+=("$OUT/exports/$name")
  done
  [ ${#folders[@]} -ge 2 ] && $PY bench/bench_pruned.py "${folders[@]}" "${folders[0]}" \
    --batch 1 3 16 --repeats 7 | tee -a "$OUT/table.md"
done
