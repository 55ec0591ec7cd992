"""The content hash (bbservice.hashing): stable, and it changes with the weights and the config."""

from __future__ import annotations

import copy

import torch

from bbservice.hashing import content_hash


def test_content_hash_follows_weights_and_config():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    config = {"kind": "music", "model": {"hidden_size": 2}}
    h = content_hash(model, config)
    assert h == content_hash(copy.deepcopy(model), dict(config)) and len(h) == 64
    assert content_hash(model, {**config, "model": {"hidden_size": 3}}) != h
    with torch.no_grad():
        model.bias[0] += 1e-6
    assert content_hash(model, config) != h
