"""The content hash that ties an export to the PyTorch model it came from.

``content_hash(model, config)``: sha256 of the config (canonical JSON) and every tensor of the
state dict (name, dtype, shape, bytes). The exporter writes it into every graph and the
manifest; the service recomputes it to accept a checkpoint for ``mode=stochastic``. torch is
imported only when a hash is computed, so the torch-free serving path can import this module.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def content_hash(model: Any, config: dict) -> str:
    """sha256 hex digest of ``config`` and ``model.state_dict()`` (any device)."""
    import torch

    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
