#!/usr/bin/env bash
# Reproduce the music table of docs/RESULTS.md: every gate family on JSB Chorales at the
# ~0.57M-parameter budget, same seed and epochs; lstm and bbeta5 on Nottingham.
# Runs two trainings at a time (one thread each); a run whose summary.json exists is skipped.
#   bash bench/results_music.sh [jsb|nottingham|all]   (default all)
set -uo pipefail
cd "$(dirname "$0")/.."
BB=.venv/bin/bbservice
OUT=${OUT:-runs/results}
COMMON="--batch-size 8 --dropout 0.3 --patience 5 --seed 1000"
run() {  # name data extra-args...
  local name=$1 data=$2; shift 2
  [ -f "$OUT/$name/summary.json" ] && { echo "skip $name (done)"; return; }
  echo "start $name"
  OMP_NUM_THREADS=1 $BB train music --data "$data" $COMMON --out "$OUT/$name" "$@" \
    > "$OUT/$name.log" 2>&1 && echo "done $name" || echo "FAILED $name (see $OUT/$name.log)"
}
mkdir -p "$OUT"
WHAT=${1:-all}
if [ "$WHAT" = jsb ] || [ "$WHAT" = all ]; then
  JSB="--epochs 60 --early-stop 12"
  run jsb_lstm jsb --gate lstm $JSB & run jsb_bbeta5 jsb --gate bbeta5 $JSB & wait
  run jsb_cifg jsb --gate cifg $JSB & run jsb_g2 jsb --gate g2 $JSB & wait
  run jsb_beta jsb --gate beta $JSB & run jsb_bbeta3 jsb --gate bbeta3 $JSB & wait
  run jsb_bbeta5_kl jsb --gate bbeta5 --kl-weight 1.0 $JSB & wait
fi
if [ "$WHAT" = nottingham ] || [ "$WHAT" = all ]; then
  NOTT="--epochs 12 --early-stop 4 --batch-size 32 --lr 3e-3"
  run nott_lstm nottingham --gate lstm $NOTT & run nott_bbeta5 nottingham --gate bbeta5 $NOTT & wait
fi
.venv/bin/python bench/results_table.py "$OUT" > "$OUT/table.md" && cat "$OUT/table.md"
