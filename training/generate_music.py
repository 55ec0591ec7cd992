"""``bbservice generate music``: new MIDI (and PNG piano rolls) from a music checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bbservice import checkpoints
from bbservice.models.music import TorchMusicStepper
from bbservice.music_generation import GenerationParams, generate_rolls
from bbservice.pianoroll import Grid, load_midi_roll, roll_to_png, write_midi
from training import common


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


def run(args: argparse.Namespace) -> int:
    device = common.pick_device(args.device)
    model, config = checkpoints.load_music(args.checkpoint, device)
    params = GenerationParams(args.frames, args.temperature, args.seed, args.num_outputs)
    grid = Grid.of_checkpoint(config)
    primer = load_midi_roll(args.primer, **grid.to_dict()) if args.primer else None
    stepper = TorchMusicStepper(model, args.mode, args.seed, device)
    rolls = generate_rolls(stepper, params, primer)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for k, roll in enumerate(rolls):
        midi_path = out / f"music_{args.seed}_{k}.mid"
        write_midi(roll, midi_path, tempo=args.tempo, **grid.to_dict())
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
