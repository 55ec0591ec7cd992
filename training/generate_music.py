"""``bbservice generate music``: new MIDI (and PNG piano rolls) from a music checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from bbservice.music_generation import GenerationParams, generate_rolls
from bbservice.pianoroll import load_midi_roll, roll_to_png, write_midi
from training import common
from training.checkpoints import load_music_checkpoint


class TorchMusicStepper:
    """The PyTorch model as a music stepper; ``gate_mode="sample"`` draws gates from ``seed``."""

    def __init__(self, model, device, gate_mode: str = "mean", seed: int = 0) -> None:
        self.model, self.device, self.gate_mode = model, device, gate_mode
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.matmuls = None

    @torch.no_grad()
    def start(self, batch: int) -> dict[str, np.ndarray]:
        self.matmuls = [cell.recurrent_matmuls(batch) for cell in self.model.rnn.cells]
        h, c = self.model.zero_state(batch, self.device)
        return {"h": h, "c": c}

    @torch.no_grad()
    def step(self, frame, state):
        x = torch.as_tensor(frame, device=self.device)
        probs, h, c = self.model.step(
            x, state["h"], state["c"], self.gate_mode, self.matmuls, self.generator
        )
        return probs.float().cpu().numpy(), {"h": h, "c": c}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run folder or its best/ folder")
    parser.add_argument("--out", default="generated", help="folder for .mid and .png files")
    parser.add_argument("--frames", type=int, default=64, help="new frames per output")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tempo", type=float, default=100.0, help="quarter notes per minute")
    parser.add_argument("--num-outputs", type=int, default=1)
    parser.add_argument("--primer", default=None, help="MIDI file the music continues")
    parser.add_argument(
        "--mode",
        default="mean",
        choices=("mean", "sample"),
        help="mean gates, or sampled (stochastic) gates",
    )
    parser.add_argument("--device", default="auto")


def grid_of(config: dict) -> dict:
    """The time grid the model was trained on (frames per quarter note, or per second)."""
    data = config.get("data", {})
    if data.get("fps"):
        return {"fps": data["fps"]}
    return {"frames_per_beat": data.get("frames_per_beat") or 1}


def run(args: argparse.Namespace) -> int:
    device = common.pick_device(args.device)
    model, config = load_music_checkpoint(args.checkpoint, device)
    params = GenerationParams(args.frames, args.temperature, args.seed, args.num_outputs)
    grid = grid_of(config)
    primer = load_midi_roll(args.primer, **grid) if args.primer else None
    stepper = TorchMusicStepper(model, device, args.mode, args.seed)
    rolls = generate_rolls(stepper, params, primer)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tempo_grid = grid if "fps" in grid else {"frames_per_beat": grid["frames_per_beat"]}
    written = []
    for k, roll in enumerate(rolls):
        midi_path = out / f"music_{args.seed}_{k}.mid"
        write_midi(roll, midi_path, tempo=args.tempo, **tempo_grid)
        roll_to_png(roll, out / f"music_{args.seed}_{k}.png")
        written.append(str(midi_path))
    print(
        json.dumps(
            {
                "files": written,
                "frames": int(rolls.shape[1]),
                "mode": args.mode,
                "seed": args.seed,
                "temperature": args.temperature,
            },
            indent=2,
        )
    )
    return 0
