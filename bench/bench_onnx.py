"""ONNX Runtime against PyTorch eager, in one process, on the same weights; prints ratios.

* captions: encoder + beam search (beam 3, ``max_length`` words) — latency of one image
  (batch 1) and throughput at batch 8 (images per second);
* music: ``generate_rolls`` of 512 frames at batch 1 — frames per second.

Both backends run the same numpy decoders (:mod:`bbservice.decoding`,
:mod:`bbservice.music_generation`) through their steppers, so the difference is the model
steps alone. The encoder's share of each caption time is printed too.

Without checkpoints the models are built from configs with random weights: the default
``CaptionConfig`` (ResNet-18 at 224 px, 7×7 grid, H = 512, bbeta5 gates) with a
``--vocab-size`` word vocabulary (default 10,000, about COCO's Karpathy vocabulary), and the
``bbeta5`` music preset (2 layers, H = 148). A random caption model rarely emits ``<end>``, so
every beam runs the full ``max_length`` steps on both backends (same work either way).

    python bench/bench_onnx.py [--caption-checkpoint DIR] [--music-checkpoint DIR]
        [--repeats 3] [--threads N] [--precision fp32|int8|fp16] [--skip-caption] [--skip-music]
        [--io-binding]

``--io-binding`` adds the ONNX Runtime steppers with IOBinding (recurrent state and features
kept as ``OrtValue``s between steps, as on CUDA) and their speed-up over the plain ones, on the
CPU provider here; the captions must be the same.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from bbservice.decoding import beam_search
from bbservice.models.caption import (
    END_ID,
    START_ID,
    CaptionConfig,
    CaptionModel,
    TorchCaptionStepper,
)
from bbservice.models.music import MusicConfig, PianoRollModel, TorchMusicStepper
from bbservice.music_generation import GenerationParams, generate_rolls
from bbservice.runtime import load_export
from export.onnx_export import export_caption, export_music


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_caption(args, out: Path) -> None:
    if args.caption_checkpoint:
        from bbservice import checkpoints

        model, vocab, _ = checkpoints.load_caption(args.caption_checkpoint, "cpu")
        itos = vocab.itos
        source = args.caption_checkpoint
    else:
        torch.manual_seed(0)
        model = CaptionModel.build(CaptionConfig(vocab_size=args.vocab_size)).eval()
        itos = None
        source = f"random weights, default CaptionConfig, vocabulary {args.vocab_size}"
    cfg = model.config
    print(
        f"caption model: {source}; {cfg.encoder} {cfg.image_size}px grid {cfg.grid_size}, "
        f"H {cfg.hidden_size}, gate {cfg.gate.family}, max_length {cfg.max_length}"
    )
    start = time.perf_counter()
    export_caption(
        model,
        out / "caption",
        vocabulary=itos,
        store=False,
        fp16=args.precision == "fp16",
        int8=args.precision == "int8",
        batch_sizes=(1, 2),
    )
    print(f"  export + verification: {time.perf_counter() - start:.1f} s")
    onnx = load_export(
        out / "caption", device="cpu", precision=args.precision, threads=args.threads
    )
    ort_stepper = onnx.caption_stepper(io_binding=False)
    torch_stepper = TorchCaptionStepper(model, "mean", device="cpu")
    kw = {"start_id": START_ID, "end_id": END_ID, "beam_size": 3, "max_length": cfg.max_length}
    rng = np.random.default_rng(0)
    if args.io_binding:
        bound = onnx.caption_stepper(io_binding=True)
        print(f"  IOBinding ({onnx.device}) against plain ONNX Runtime, beam 3:")
        for batch in (1, 8):
            images = rng.standard_normal((batch, 3, cfg.image_size, cfg.image_size))
            images = images.astype(np.float32)
            plain_s = median_seconds(partial(beam_search, ort_stepper, images, **kw), args.repeats)
            bound_s = median_seconds(partial(beam_search, bound, images, **kw), args.repeats)
            same = [h.tokens for hs in beam_search(ort_stepper, images, **kw) for h in hs] == [
                h.tokens for hs in beam_search(bound, images, **kw) for h in hs
            ]
            print(
                f"    batch {batch}: plain {plain_s * 1e3:8.1f} ms, "
                f"IOBinding {bound_s * 1e3:8.1f} ms, speed-up {plain_s / bound_s:5.2f}x, "
                f"same captions: {same}"
            )
    print(f"  {'':28s} {'torch':>10s} {'onnx':>10s} {'speed-up':>9s}")
    for batch in (1, 8):
        images = rng.standard_normal((batch, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
        times = {}
        for name, stepper in (("torch", torch_stepper), ("onnx", ort_stepper)):
            with torch.inference_mode():
                total = median_seconds(partial(beam_search, stepper, images, **kw), args.repeats)
                encode = median_seconds(partial(stepper.start, images), args.repeats)
            times[name] = (total, encode, total - encode)
        (t_total, t_enc, t_dec), (o_total, o_enc, o_dec) = times["torch"], times["onnx"]
        if batch == 1:
            label, t_val, o_val = "latency, batch 1 (ms)", t_total * 1e3, o_total * 1e3
            fmt = "10.1f"
        else:
            label, t_val, o_val = (
                f"throughput, batch {batch} (img/s)",
                batch / t_total,
                batch / o_total,
            )
            fmt = "10.2f"
        print(f"  {label:28s} {t_val:{fmt}} {o_val:{fmt}} {t_total / o_total:8.2f}x")
        for part, t, o in (("encoder + init", t_enc, o_enc), ("beam decoding", t_dec, o_dec)):
            print(f"  {'  ' + part + ' (ms)':28s} {t * 1e3:10.1f} {o * 1e3:10.1f} {t / o:8.2f}x")


class PrepackedTorchMusicStepper(TorchMusicStepper):
    """``TorchMusicStepper`` with the recurrent matmuls made once per sequence, not per step.

    ``PianoRollModel.step`` asks each cell for ``recurrent_matmuls`` on every call, which on
    the CPU re-packs the oneDNN weights every frame; ``plain=True`` uses plain ``addmm``.
    """

    def __init__(self, model, plain: bool = False) -> None:
        super().__init__(model, "mean", 0, "cpu")
        self.plain, self.matmuls = plain, None

    def start(self, batch: int):
        cells = self.model.rnn.cells
        if self.plain:
            self.matmuls = [(partial(_addmm, cell.weight_hh.t()), None) for cell in cells]
        else:
            self.matmuls = [cell.recurrent_matmuls(batch) for cell in cells]
        return super().start(batch)

    @torch.inference_mode()
    def step(self, frame, state):
        x, h, c = torch.as_tensor(frame), state["h"], state["c"]
        hs, cs = [], []
        for layer, cell in enumerate(self.model.rnn.cells):
            h_l, c_l, _ = cell.recurrent_step(
                cell.input_projection(x), (h[layer], c[layer]), "mean", matmuls=self.matmuls[layer]
            )
            hs.append(h_l)
            cs.append(c_l)
            x = h_l
        probs = torch.sigmoid(self.model.readout(x))
        return probs.numpy(), {"h": torch.stack(hs), "c": torch.stack(cs)}


def _addmm(weight_t, add, x):
    return torch.addmm(add, x, weight_t)


def bench_music(args, out: Path) -> None:
    if args.music_checkpoint:
        from bbservice import checkpoints

        model, config = checkpoints.load_music(args.music_checkpoint, "cpu")
        source = args.music_checkpoint
    else:
        torch.manual_seed(0)
        model, config = PianoRollModel(MusicConfig.preset("bbeta5")).eval(), None
        source = "random weights, bbeta5 preset"
    cfg = model.config
    print(
        f"music model: {source}; {cfg.num_layers} layers, H {cfg.hidden_size}, "
        f"gate {cfg.gate.family}"
    )
    export_music(
        model,
        out / "music",
        config=config,
        store=False,
        fp16=args.precision == "fp16",
        int8=args.precision == "int8",
    )
    onnx = load_export(out / "music", device="cpu", precision=args.precision, threads=args.threads)
    params = GenerationParams(frames=args.frames, seed=0, num_outputs=1)
    n = args.frames
    steppers = {
        "torch eager (TorchMusicStepper)": TorchMusicStepper(model, device="cpu"),
        "torch eager, packed once": PrepackedTorchMusicStepper(model),
        "torch eager, plain addmm": PrepackedTorchMusicStepper(model, plain=True),
        "onnx runtime": onnx.music_stepper(io_binding=False),
    }
    if args.io_binding:
        steppers["onnx runtime, IOBinding"] = onnx.music_stepper(io_binding=True)
    times = {}
    for name, stepper in steppers.items():
        with torch.inference_mode():
            times[name] = median_seconds(partial(generate_rolls, stepper, params), args.repeats)
    o = times["onnx runtime"]
    print(f"  {n} frames, batch 1: {'frames/s':>10s} {'ms/frame':>9s} {'onnx speed-up':>14s}")
    for name, t in times.items():
        print(f"  {name:34s} {n / t:10.0f} {t / n * 1e3:9.3f} {t / o:13.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caption-checkpoint", default=None)
    parser.add_argument("--music-checkpoint", default=None)
    parser.add_argument("--vocab-size", type=int, default=10_000)
    parser.add_argument("--frames", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=None, help="threads of both backends (default: torch's)"
    )
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "int8"))
    parser.add_argument("--skip-caption", action="store_true")
    parser.add_argument("--skip-music", action="store_true")
    parser.add_argument(
        "--io-binding",
        action="store_true",
        help="also time ONNX Runtime with IOBinding (state kept as OrtValues) against plain",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads is None:
        args.threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} threads for both backends, "
        f"ONNX Runtime precision {args.precision}, median of {args.repeats}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_music:
            bench_music(args, Path(tmp))
        if not args.skip_caption:
            bench_caption(args, Path(tmp))


if __name__ == "__main__":
    main()
