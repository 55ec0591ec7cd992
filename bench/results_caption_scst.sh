#!/usr/bin/env bash
# Cross-entropy against cross-entropy + self-critical training (SCST) for the `lstm` and
# `bbeta5` caption decoders on the generated scenes, at the same epoch budget; test and
# test_holdout, BLEU-4 / CIDEr-D / ROUGE-L (docs/results_caption.md, issue 16).
#
#   bash bench/results_caption_scst.sh [full|quick|frozen] [SEED ...]   (default: full 1 2 3)
#   GATES=lstm bash bench/results_caption_scst.sh ...                   (one decoder only)
#
# full : configs/caption/scenes_{lstm,bbeta5}.toml (issue 14's protocol: ResNet-18 fine-tuned
#        from scratch, at most 40 epochs) against scenes_{lstm,bbeta5}_scst.toml (30 CE + 10 SCST)
# quick: configs/caption/quick_{lstm,bbeta5}.toml (frozen random ResNet-18, features from the
#        feature cache, 10 epochs) against quick_{lstm,bbeta5}_scst.toml (7 CE + 3 SCST)
# frozen: configs/caption/frozen_{lstm,bbeta5}.toml (a trained ResNet-18 kept frozen, features
#        from the feature cache, 12 epochs) against frozen_{lstm,bbeta5}_scst.toml (8 CE + 4
#        SCST); the encoder comes from one run of configs/caption/scenes_encoder.toml (seed 0),
#        trained first when $RUNS/scenes_encoder is not finished
#
# Resumable: a finished run (marked .done) is skipped, an unfinished one continues from its
# last/ (--resume), an evaluation with its JSON is skipped. Run folders live under $RUNS (default
# ~/bbservice-runs/caption), outside the work tree; the scenes under ~/bbservice-runs/scenes64
# (generated here when absent, with the command of docs/results_caption.md). Two runs train at
# a time (lstm and bbeta5 of a variant), one intra-op thread each. The table is printed at the
# end from whatever evaluations exist.
set -euo pipefail

TIER=${1:-full}
shift || true
SEEDS=${*:-1 2 3}
REPO=$(cd "$(dirname "$0")/.." && pwd)
RUNS=${RUNS:-$HOME/bbservice-runs/caption}
SCENES=$HOME/bbservice-runs/scenes64
DATA=$SCENES/dataset_scenes.json
BB=${BB:-$REPO/.venv/bin/bbservice}
PY=${PY:-$REPO/.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} BENTOML_DO_NOT_TRACK=True

case $TIER in
  full) PREFIX=scenes ;;
  quick) PREFIX=quick ;;
  frozen) PREFIX=frozen ;;
  *) echo "usage: $0 [full|quick|frozen] [SEED ...]" >&2; exit 2 ;;
esac
OUT=$RUNS/$TIER
mkdir -p "$OUT/eval"

if [ ! -f "$DATA" ]; then
  "$BB" generate scenes --out "$SCENES" --n-train 4000 --n-val 200 --n-test 300 \
    --n-holdout 300 --image-size 64 --holdout red:triangle,blue:circle,green:square --seed 0
fi

done_run() { [ -f "$OUT/$1_s$2/.done" ]; }

EXTRA=()  # options every run of the tier adds
if [ "$TIER" = frozen ]; then
  ENCODER=$RUNS/scenes_encoder
  if [ ! -f "$ENCODER/.done" ]; then
    mkdir -p "$ENCODER"
    "$BB" train caption --config "$REPO/configs/caption/scenes_encoder.toml" --out "$ENCODER" \
      --resume-if-present >>"$ENCODER/train.log" 2>&1
    touch "$ENCODER/.done"
  fi
  EXTRA=(--encoder-weights "$ENCODER" --feature-cache "$RUNS/cache")
fi

train() {  # train VARIANT SEED [OPTION ...]: continues from last/ if there is one
  local variant=$1 seed=$2 run=$OUT/$1_s$2
  shift 2
  mkdir -p "$run"
  "$BB" train caption --config "$REPO/configs/caption/${PREFIX}_$variant.toml" --seed "$seed" \
    --out "$run" --resume-if-present "${EXTRA[@]}" "$@" >>"$run/train.log" 2>&1
}

variants() {  # variants GATE: the tier's SCST variants of GATE that have a config
  local v
  for v in "$1_scst" "$1_scst_gates"; do
    [ -f "$REPO/configs/caption/${PREFIX}_$v.toml" ] && echo "$v"
  done
}

pair() {  # pair GATE SEED: the cross-entropy run and its SCST variants
  # The SCST runs' first scst_after epochs are the cross-entropy run's (same config and seed),
  # so they are trained once: the CE run stops after scst_after epochs, its folder is copied
  # to each SCST run, and all continue from last/ (which reproduces an uninterrupted run,
  # tests/test_train_caption.py::test_resume_continues_after_the_last_finished_epoch).
  local gate=$1 seed=$2 ce=$OUT/$1_s$2 after variant scst
  after=$(sed -n 's/^scst_after *= *\([0-9]*\).*/\1/p' "$REPO/configs/caption/${PREFIX}_${gate}_scst.toml")
  for variant in $(variants "$gate"); do
    scst=$OUT/${variant}_s$seed
    if ! done_run "$variant" "$seed" && [ ! -f "$scst/last/trainer.pt" ]; then
      [ -f "$ce/.done" ] || [ "$(cat "$ce/metrics.jsonl" 2>/dev/null | wc -l)" -ge "$after" ] ||
        train "$gate" "$seed" --epochs "$after"
      if [ "$(cat "$ce/metrics.jsonl" 2>/dev/null | wc -l)" -eq "$after" ]; then
        rm -rf "$scst" && cp -r "$ce" "$scst" && rm -f "$scst/summary.json"
        echo "branched: $scst after epoch $after of $ce"
      fi  # else the CE run is already past the branch point: the SCST run trains from scratch
    fi
  done
  done_run "$gate" "$seed" || { train "$gate" "$seed" && touch "$ce/.done"; }
  for variant in $(variants "$gate"); do
    done_run "$variant" "$seed" || { train "$variant" "$seed" && touch "$OUT/${variant}_s$seed/.done"; }
  done
  echo "trained: $ce and its SCST variants"
}

evaluate() {  # evaluate VARIANT SEED
  local run=$OUT/$1_s$2 split beam json
  for split in test test_holdout; do
    for beam in 1 3; do
      json=$OUT/eval/$1_s$2_${split}_b$beam.json
      [ -f "$json" ] && continue
      "$BB" eval caption --checkpoint "$run" --data "$DATA" --split "$split" --beam "$beam" \
        --no-progress --out "$json" >/dev/null
    done
  done
}

GATES=${GATES:-lstm bbeta5}  # the decoders to train (both by default)
for seed in $SEEDS; do
  first=
  for gate in $GATES; do
    if [ -n "$first" ]; then
      # Every gate of a seed shares the frozen encoder's feature-cache entries: the later ones
      # start once the first has built (or opened) them, so no entry is built twice at once.
      log=$OUT/${firstgate}_s$seed/train.log
      while kill -0 "$first" 2>/dev/null && ! grep -qs "process(es)" "$log"; do sleep 5; done
    fi
    pair "$gate" "$seed" &
    if [ -z "$first" ]; then first=$! firstgate=$gate; fi
  done
  wait
  for gate in $GATES; do
    for variant in "$gate" $(variants "$gate"); do evaluate "$variant" "$seed"; done
  done
done

"$PY" - "$OUT" <<'EOF'
"""The results table (markdown) of the evaluations and runs that exist under OUT."""
import json
import re
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1])
rows = {}
for path in sorted((out / "eval").glob("*.json")):
    run, seed, split, beam = re.fullmatch(r"(.+)_s(\d+)_(.+)_b(\d+)", path.stem).groups()
    rows.setdefault((split, int(beam), run), {})[int(seed)] = json.loads(path.read_text())
print("| split | decoding | model | seeds | BLEU-4 | CIDEr-D | ROUGE-L |")
print("|---|---|---|---|---:|---:|---:|")
for (split, beam, run), by_seed in sorted(rows.items()):
    cells = []
    for key in ("BLEU-4", "CIDEr-D", "ROUGE-L"):
        values = [by_seed[s]["metrics"][key] for s in sorted(by_seed)]
        each = " / ".join(f"{v:.3f}" for v in values)
        cells.append(f"{each} (**{statistics.mean(values):.3f}**)" if len(values) > 1 else each)
    seeds = ",".join(map(str, sorted(by_seed)))
    decoding = "greedy" if beam == 1 else f"beam {beam}"
    print(f"| {split} | {decoding} | `{run}` | {seeds} | " + " | ".join(cells) + " |")
print()
print("| run | best epoch | CE s/epoch | SCST s/epoch | last SCST reward |")
print("|---|---:|---:|---:|---:|")
for run in sorted(p for p in out.iterdir() if (p / "metrics.jsonl").is_file()):
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ce = [r["epoch_seconds"] for r in recs if r.get("phase", "ce") == "ce"]
    scst = [r["epoch_seconds"] for r in recs if r.get("phase") == "scst"]
    reward = [r["train_reward"] for r in recs if r.get("phase") == "scst"]
    best = max(recs, key=lambda r: r["val_CIDEr-D"])["epoch"] if recs else "-"
    mean = lambda xs: f"{statistics.mean(xs):.1f}" if xs else "-"  # noqa: E731
    last = f"{reward[-1]:.3f}" if reward else "-"
    print(f"| {run.name} ({len(recs)} epochs) | {best} | {mean(ce)} | {mean(scst)} | {last} |")
EOF
