"""Shared fixtures: the reference data folder, and a private BentoML home for every test run."""

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="bbservice-bentoml-"))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data``; the test is skipped with a reason where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not found at {SHARED_DATA}")
    return SHARED_DATA


# -- sparse models (tests of bbservice.sparse, bbservice.pruning, bbservice.prune_report) -------

SPARSE_H = 8
PRUNE_ALL = 20.0  # a log σ² that prunes any variable (log α clips to 8 > 3)


def sparse_music_model(family: str, seed: int = 0):
    """A small sparse piano-roll model (hidden 8, eval mode)."""
    import torch

    from bbservice.models.music import MusicConfig, PianoRollModel

    torch.manual_seed(seed)
    return PianoRollModel(MusicConfig.preset(family, hidden_size=SPARSE_H, sparse=True)).eval()


def prune_some(model, seed: int = 0) -> None:
    """Prune on every level: weights, inputs, a dead hidden unit, pre-activation rows."""
    import torch

    H, BIG = SPARSE_H, PRUNE_ALL
    g = torch.Generator().manual_seed(seed)
    c0, c1 = model.rnn.cells
    with torch.no_grad():
        c0.log_sigma2_ih[torch.rand(c0.weight_ih.shape, generator=g) < 0.5] = BIG
        c1.log_sigma2_hh[torch.rand(c1.weight_hh.shape, generator=g) < 0.4] = BIG
        c0.log_sigma2_x[:50] = BIG  # 50 of 88 keys unused
        c0.log_sigma2_h[5] = BIG  # unit 5 of layer 0: no recurrent reader ...
        c1.log_sigma2_x[5] = BIG  # ... and no reader above: dead
        c0.log_sigma2_z[[1, H + 2, 3 * H + 4]] = BIG  # three constant rows of layer 0
        c1.log_sigma2_z[2 * H : 2 * H + 3] = BIG


def tiny_caption_config(gate: str = "bbeta5", sparse: bool = True):
    """A tiny caption model config (32 px, 2×2 grid, E = 8, H = 8)."""
    from bbservice.models.caption import CaptionConfig

    return CaptionConfig(
        vocab_size=11,
        encoder_stages=2,
        image_size=32,
        grid_size=2,
        embed_dim=8,
        attention_dim=8,
        hidden_size=SPARSE_H,
        dropout=0.0,
        gate=gate,
        max_length=6,
        sparse=sparse,
    )


def write_random_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` PNGs of random pixels and random sizes (20-59 px a side) in ``folder``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = rng.integers(20, 60, size=2)
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


# -- killed training runs (tests of exact resume) ------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def kill_training_at(argv: list[str], pause: str, tmp_path: Path, timeout: float = 240) -> str:
    """Run ``python -m bbservice.cli *argv`` in a real subprocess (one thread), wait until it
    reaches the pause point ``pause`` (:func:`training.common.pause_point`), SIGKILL it and
    return its log. Fails if it ends or times out first."""
    import signal
    import subprocess
    import sys
    import time

    marker, log_path = tmp_path / f"paused-{os.getpid()}", tmp_path / "killed.log"
    marker.unlink(missing_ok=True)
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONPATH=str(REPO),
        BBSERVICE_PAUSE_AT=pause,
        BBSERVICE_PAUSE_MARKER=str(marker),
    )
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bbservice.cli", *argv],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        try:
            while not marker.exists():
                if proc.poll() is not None:
                    pytest.fail(f"training ended before {pause}: {log_path.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"training did not reach {pause} within {timeout} s")
                time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return log_path.read_text()


def same_weights(a: Path, b: Path) -> list[str]:
    """Names of the tensors that differ (bit for bit) between two checkpoint folders."""
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return [k for k in wa if not (wa[k].dtype == wb[k].dtype and wa[k].equal(wb[k]))]


def without_times(records: list[dict]) -> list[dict]:
    """Metrics records without their wall-clock fields."""
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in records]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is as fast, and does not thrash on a busy 2-core box.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
