#!/usr/bin/env bash
# Prepare what bench/gpu_check.py installs on a GPU machine that has its own CUDA torch and no
# network (the device tool's machines: Python 3.12, torch 2.11, triton, onnxruntime CPU build):
# small wheels for Python 3.12 manylinux x86_64 into wheels/ (gitignored), and the JSB
# benchmark file into gpu_check_data/ (gitignored). Run here, where PyPI is reachable:
#
#   bash bench/prepare_gpu_wheels.sh            # TORCH_VERSION=2.11 -> torchvision 0.26.0
#
# Left out on purpose (they would not fit the 64 MiB the device tool carries): torch, numpy,
# onnxruntime (the machine has them), scipy (35 MB; only its .mat reader is used, so the .mat
# is also carried as the pitch-list .json the project's loader reads, converted here by the
# project's own load_mat), music21 and bentoml (gpu_check needs neither), and the Java parts of
# pycocoevalcap (METEOR/SPICE/tokenizer jars and data, 100 MB: the project's scorers BLEU,
# ROUGE-L and CIDEr-D are pure Python; the wheel is repacked without the rest).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TORCH_VERSION=${TORCH_VERSION:-2.11}
TV_MINOR=$(( ${TORCH_VERSION#*.} + 15 ))   # torchvision 0.(minor+15) goes with torch 2.minor
WHEELS=${WHEELS:-wheels}
DATA=${DATA:-gpu_check_data}
JSB=${JSB:-../shared/data/polyphonic/JSB_Chorales.mat}
rm -rf "$WHEELS" && mkdir -p "$WHEELS" "$DATA"
download() {
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$WHEELS" "$@"
}
download pretty_midi mido six importlib_resources safetensors tqdm pillow packaging \
  onnx protobuf ml_dtypes onnxscript onnx_ir \
  matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil \
  "setuptools>=77" "torchvision==0.${TV_MINOR}.*" pycocoevalcap
"$PY" - "$WHEELS" <<'PYEOF'
"""Repack pycocoevalcap without its Java parts (the scorers used here are pure Python)."""
import sys
import zipfile
from pathlib import Path

folder = Path(sys.argv[1])
(src,) = folder.glob("pycocoevalcap-*.whl")
dst = folder / "repacked.tmp"
drop = ("pycocoevalcap/meteor/", "pycocoevalcap/spice/", "pycocoevalcap/tokenizer/")
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if item.filename.startswith(drop) and not item.filename.endswith(".py"):
            continue
        data = zin.read(item.filename)
        if item.filename.endswith("/RECORD"):
            lines = data.decode().splitlines()
            keep = [ln for ln in lines if not ln.startswith(drop) or ln.split(",")[0].endswith(".py")]
            data = ("\n".join(keep) + "\n").encode()
        zout.writestr(item, data)
dst.replace(src)  # same name and version: pip checks that they match the metadata
PYEOF
"$PY" - "$JSB" "$DATA" <<'PYEOF'
"""JSB: the .mat as it is, and as the pitch-list JSON the loader reads without scipy."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from bbservice.pianoroll import LOWEST_PITCH
from training.music_data import load_mat

src, out = Path(sys.argv[1]), Path(sys.argv[2])
shutil.copy(src, out / src.name)
splits = load_mat(src)
pitches = {
    name: [[[int(k) + LOWEST_PITCH for k in np.flatnonzero(f)] for f in roll] for roll in rolls]
    for name, rolls in (("train", splits.train), ("valid", splits.valid), ("test", splits.test))
}
(out / f"{src.stem}.json").write_text(json.dumps(pitches))
PYEOF
du -sh "$WHEELS" "$DATA"
ls "$WHEELS"
