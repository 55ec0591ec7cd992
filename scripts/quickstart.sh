#!/usr/bin/env bash
# One command from a fresh clone: set up .venv, build the small default models where none
# exist (music on the embedded Bach chorales), and use them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh train,cpu,serve,dev
export BENTOML_DO_NOT_TRACK=True
BB=.venv/bin/bbservice
if [ ! -f artifacts/music/best/model.safetensors ]; then
  echo "quickstart: training the default music model on the embedded chorales (a few minutes)"
  $BB train music --data chorales --gate bbeta5 --epochs 25 --batch-size 8 --dropout 0.2 \
    --out artifacts/music
fi
$BB generate music --checkpoint artifacts/music --out artifacts/generated --frames 64 \
  --num-outputs 2 --seed 0 --tempo 90
