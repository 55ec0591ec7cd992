"""Loading trained models back from their checkpoint folders."""

from __future__ import annotations

from pathlib import Path

import torch

from bbservice.errors import DataError
from bbservice.models.music import MusicConfig, PianoRollModel
from training import common


def load_music_checkpoint(
    folder: str | Path, device: torch.device | str = "cpu"
) -> tuple[PianoRollModel, dict]:
    """(model in eval mode, checkpoint config) from a ``best/`` or ``last/`` folder.

    A run folder (holding ``best/``) is accepted too.
    """
    folder = Path(folder)
    if (folder / "best" / "config.json").exists():
        folder = folder / "best"
    config = common.load_checkpoint_config(folder)
    if config.get("kind") != "music":
        raise DataError(f"checkpoint '{folder}' is a {config.get('kind')!r} model, not music")
    model = PianoRollModel(MusicConfig.from_dict(config["model"]))
    try:
        common.load_weights(model, folder, device)
    except (RuntimeError, OSError) as err:
        raise DataError(f"weights of checkpoint '{folder}' do not load: {err}") from err
    return model.to(device).eval(), config
