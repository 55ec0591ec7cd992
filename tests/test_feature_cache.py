"""training.feature_cache: fp16 features of a frozen encoder, built once, reused without an
encoder pass, keyed by weights, image size and images; a two-process (gloo, torchrun) build
equals a single-process one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_random_images as write_images

from bbservice.errors import ConfigError
from bbservice.models.caption import CaptionConfig, ResNetEncoder
from training.feature_cache import FeatureCache, feature_key
from training.image_store import ImageStore

REPO = Path(__file__).resolve().parents[1]
CONFIG = CaptionConfig(vocab_size=11, encoder_stages=1, image_size=32, grid_size=2)


def encoder(config: CaptionConfig = CONFIG, seed: int = 0) -> ResNetEncoder:
    torch.manual_seed(seed)
    enc = ResNetEncoder(config.encoder, config.grid_size, config.encoder_stages)
    with torch.no_grad():  # non-trivial batch-norm statistics, so the hash sees them
        enc.body.bn1.running_mean.uniform_(-0.5, 0.5)
    return enc


class Counting(ResNetEncoder):
    calls = 0

    def forward(self, images):
        Counting.calls += 1
        return super().forward(images)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def images(tmp_path):
    paths = write_images(tmp_path / "img", 5)
    return paths, ImageStore.build(paths, CONFIG.image_size, tmp_path / "cache", progress=False)


def test_features_are_the_encoders_in_fp16(images, tmp_path):
    paths, store = images
    enc = encoder()
    cache = FeatureCache.build(
        CONFIG, enc, store, paths, tmp_path / "cache", batch_size=2, progress=False
    )
    assert cache.built and cache.array.dtype == np.float16
    assert cache.array.shape == (5, CONFIG.positions, CONFIG.feature_dim) == (5, 4, 64)
    with torch.no_grad():
        want = enc(torch.stack([store[i] for i in range(5)]))
    got = torch.stack([cache[i] for i in range(5)])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2**-10, atol=1e-4)
    assert enc.training  # the mode it came in


def test_second_build_runs_no_encoder_and_keys_invalidate(images, tmp_path):
    paths, store = images
    root = tmp_path / "cache"
    torch.manual_seed(0)
    enc = Counting(CONFIG.encoder, CONFIG.grid_size, CONFIG.encoder_stages)
    first = FeatureCache.build(CONFIG, enc, store, paths, root, progress=False)
    assert first.built and Counting.calls > 0
    Counting.calls = 0
    again = FeatureCache.build(CONFIG, enc, store, paths, root, progress=False)
    assert not again.built and Counting.calls == 0
    np.testing.assert_array_equal(again.array, first.array)

    with torch.no_grad():
        enc.body.bn1.running_var.mul_(1.5)  # other weights (statistics count too)
    changed = FeatureCache.build(CONFIG, enc, store, paths, root, progress=False)
    assert changed.built and changed.key["weights_sha256"] != first.key["weights_sha256"]
    assert not np.array_equal(changed.array, first.array)
    big = replace(CONFIG, image_size=48)
    big_store = ImageStore.build(paths, 48, root, progress=False)
    assert FeatureCache.build(big, enc, big_store, paths, root, progress=False).built
    sub = FeatureCache.build(
        CONFIG, enc, [store[i] for i in range(4)], paths[:4], root, progress=False
    )
    assert sub.built and len(sub) == 4
    np.testing.assert_array_equal(sub.array, changed.array[:4])
    keys = {feature_key(c, enc, p)["images"] for c, p in ((CONFIG, paths), (CONFIG, paths[:4]))}
    assert len(keys) == 2


def test_a_fine_tuned_encoder_has_no_cache(images, tmp_path):
    paths, store = images
    enc = ResNetEncoder(CONFIG.encoder, CONFIG.grid_size, CONFIG.encoder_stages, fine_tune=True)
    with pytest.raises(ConfigError, match="frozen encoder"):
        FeatureCache.build(CONFIG, enc, store, paths, tmp_path / "cache", progress=False)
    with pytest.raises(ConfigError, match="5 images but 4 paths"):
        FeatureCache.build(CONFIG, encoder(), store, paths[:4], tmp_path / "cache", progress=False)


WORKER = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
from bbservice.models.caption import CaptionConfig, ResNetEncoder
from training.feature_cache import FeatureCache
from training.image_store import ImageStore
from training.sharded_array import Ranks
torch.set_num_threads(1)
dist.init_process_group("gloo")
config = CaptionConfig.from_dict({config!r})
enc = ResNetEncoder(config.encoder, config.grid_size, config.encoder_stages)
enc.load_state_dict(torch.load({weights!r}))
paths = {paths!r}
store = ImageStore.build(paths, config.image_size, {root!r}, progress=False)
cache = FeatureCache.build(config, enc, store, paths, {root!r}, batch_size=2, progress=False)
assert Ranks.current().world_size == 2 and cache.built and store.built
dist.barrier()
dist.destroy_process_group()
"""


def test_two_process_gloo_build_equals_single_process(images, tmp_path):
    paths, store = images
    single = FeatureCache.build(CONFIG, encoder(), store, paths, tmp_path / "cache", progress=False)
    script = tmp_path / "worker.py"
    root = tmp_path / "ddp-cache"
    weights = tmp_path / "encoder.pt"
    torch.save(encoder().state_dict(), weights)
    config = CONFIG.to_dict()
    script.write_text(
        WORKER.format(
            repo=str(REPO),
            config=config,
            weights=str(weights),
            paths=[str(p) for p in paths],
            root=str(root),
        )
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        _, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("torchrun did not finish within 180 s")
    assert proc.returncode == 0, stderr[-3000:]
    shared = FeatureCache.build(CONFIG, encoder(), store, paths, root, progress=False)
    assert not shared.built  # the two ranks built it; this opens it
    np.testing.assert_allclose(
        shared.array.astype(np.float32), single.array.astype(np.float32), rtol=2**-9, atol=1e-3
    )
    images_two = ImageStore.build(paths, CONFIG.image_size, root, progress=False)
    assert not images_two.built
    np.testing.assert_array_equal(images_two.array, store.array)
