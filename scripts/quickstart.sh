#!/usr/bin/env bash
# One command from a fresh clone: set up .venv, build the small default models where none
# exist (music on the embedded Bach chorales, captions on generated shape scenes), export them
# to ONNX (verified against PyTorch, and saved into BentoML's model store), and serve both on
# http://127.0.0.1:3000 (Ctrl-C stops the server).
#
#   PORT=3000        port to serve on
#   SERVE=0          stop after exporting (no server)
#   SKIP_SETUP=1     reuse an existing .venv as it is (no pip install)
#   MUSIC_EPOCHS=10, CAPTION_EPOCHS=6   training epochs of the default models
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${SKIP_SETUP:-0}" != 1 ] || [ ! -x .venv/bin/bbservice ]; then
  bash scripts/setup.sh train,cpu,serve,dev
fi
export BENTOML_DO_NOT_TRACK=True
BB=.venv/bin/bbservice
PY=.venv/bin/python
PORT="${PORT:-3000}"

# -- music: the bbeta5 model on the 350 chorales that ship with music21 --------------------------
if [ ! -f artifacts/music/best/model.safetensors ]; then
  echo "quickstart: training the default music model on the embedded chorales (a few minutes)"
  $BB train music --data chorales --gate bbeta5 --epochs "${MUSIC_EPOCHS:-10}" --batch-size 8 \
    --dropout 0.2 --out artifacts/music
fi
$BB generate music --checkpoint artifacts/music --out artifacts/generated --frames 64 \
  --num-outputs 2 --seed 0 --tempo 90

# -- captions: a small attention model on rendered shape scenes ----------------------------------
if [ ! -f artifacts/scenes/dataset_scenes.json ]; then
  echo "quickstart: rendering the captioned shape scenes"
  $BB generate scenes --out artifacts/scenes --n-train 2000 --n-val 200 --n-test 200 \
    --image-size 64 --holdout red:triangle,blue:circle --seed 0
fi
if [ ! -f artifacts/caption/best/model.safetensors ]; then
  echo "quickstart: training the default caption model on the scenes (minutes on a CPU)"
  $BB train caption --data artifacts/scenes/dataset_scenes.json --out artifacts/caption \
    --gate bbeta5 --encoder resnet18 --fine-tune --image-size 64 --encoder-stages 3 --grid 4 \
    --hidden 192 --embed-dim 64 --attention-dim 64 --max-length 12 --min-count 1 \
    --batch-size 32 --lr 3e-3 --encoder-lr 1e-3 --epochs "${CAPTION_EPOCHS:-6}" --device cpu
fi

# -- export: ONNX graphs + manifest (+ the model store entry) where missing or stale -------------
for kind in music caption; do
  ckpt=artifacts/$kind/best/model.safetensors
  out=artifacts/exports/$kind
  if [ ! -f "$out/manifest.json" ] || [ "$ckpt" -nt "$out/manifest.json" ] \
    || ! $PY -m bentoml models get "bbservice-$kind:latest" >/dev/null 2>&1; then
    echo "quickstart: exporting the $kind model to ONNX and the BentoML model store"
    $BB export "$kind" "artifacts/$kind" --out "$out"
  fi
done

if [ "${SERVE:-1}" = 0 ]; then
  echo "quickstart: models exported; serve them with: $BB serve --port $PORT"
  exit 0
fi
echo "quickstart: serving on http://127.0.0.1:$PORT (docs/serving.md has the curl calls)"
exec $BB serve --host 127.0.0.1 --port "$PORT"
