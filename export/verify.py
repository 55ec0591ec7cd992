"""Parity of the exported graphs with the PyTorch model (mean gates), run by every export.

Two kinds of checks, over batch sizes 1 and several (default 1 and 5):

* **Graph outputs.** Every output of every graph is compared with PyTorch eager (the model as
  users run it, CPU fast paths included) on *random* inputs (random frames, images, tokens and
  states) and on *real* ones: music — a rollout from the zero state over binary frames drawn
  from the model itself (or a primer piece), each backend carrying its own state so errors
  that accumulate over steps show; captions — rendered scene images (or given ones) through
  the encoder and the init graph, and a greedy rollout of the step graph on their features.
  An output passes when ``|ort − torch| <= tol · max(1, |torch|)`` everywhere: absolute for
  values of magnitude up to 1 (probabilities, states, attention), relative above (encoder
  features, log-probabilities far below 0).
* **End to end.** Music: :func:`bbservice.music_generation.generate_rolls` from one seed gives
  the same MIDI bytes through ``TorchMusicStepper`` and ``OnnxMusicStepper``. Captions:
  :func:`bbservice.decoding.beam_search` (beam 3) gives the same captions through
  ``TorchCaptionStepper`` and ``OnnxCaptionStepper``.

:class:`MusicVerifier` / :class:`CaptionVerifier` compute the PyTorch side once; ``verify``
raises :class:`VerificationError` naming the graph, the output, the inputs and the max abs
difference of the worst failure, and ``measure`` reports the same numbers without judging them
(for the fp16 and int8 variants).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from bbservice.decoding import beam_search
from bbservice.errors import BBServiceError
from bbservice.images import preprocess
from bbservice.models.caption import CaptionModel, TorchCaptionStepper
from bbservice.models.music import PianoRollModel, TorchMusicStepper
from bbservice.music_generation import GenerationParams, generate_rolls
from bbservice.pianoroll import N_KEYS, midi_bytes
from bbservice.runtime import OnnxCaptionStepper, OnnxMusicStepper, make_session
from bbservice.vocab import END_ID, START_ID

DEFAULT_TOLERANCE = 1e-4
DEFAULT_BATCH_SIZES = (1, 5)
CRITERION = "|ort - torch| <= tolerance * max(1, |torch|)"
CAPTION_GRAPHS = ("caption_encoder", "caption_init", "caption_step")


class VerificationError(BBServiceError):
    """ONNX Runtime and PyTorch disagree beyond the tolerance."""


# --------------------------------------------------------------------------------------------
# Cases and comparisons
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    """Inputs of one graph over one or more steps, with PyTorch's outputs.

    ``feeds`` holds the per-step inputs; ``state`` the initial state inputs, which the ONNX run
    threads through the steps (output ``state_outputs[k]`` feeds input ``k`` next step).
    ``reference`` holds PyTorch's outputs stacked over steps.
    """

    graph: str
    inputs: str
    batch: int
    feeds: list[dict[str, np.ndarray]]
    reference: dict[str, np.ndarray]
    state: dict[str, np.ndarray] | None = None
    state_outputs: dict[str, str] | None = None  # state input -> output feeding it


def run_case(session, case: Case) -> dict[str, np.ndarray]:
    """The case's outputs on an ONNX Runtime session, stacked over steps."""
    names = list(case.reference)
    state = dict(case.state or {})
    outs: dict[str, list] = {n: [] for n in names}
    for feed in case.feeds:
        result = dict(zip(names, session.run(names, {**feed, **state}), strict=True))
        for n in names:
            outs[n].append(result[n])
        state = {k: result[out] for k, out in (case.state_outputs or {}).items()}
    return {n: np.stack(v) for n, v in outs.items()}


def compare(
    graph: str, inputs: str, batch: int, reference: dict[str, np.ndarray], actual: dict
) -> list[dict]:
    """One record per output: max abs difference and max scaled difference (module doc)."""
    records = []
    for name, ref in reference.items():
        ref = np.asarray(ref, dtype=np.float64)
        got = np.asarray(actual[name], dtype=np.float64)
        if ref.shape != got.shape:
            raise VerificationError(
                f"{graph} output '{name}' has shape {got.shape} on ONNX Runtime but {ref.shape} "
                f"in PyTorch ({inputs} inputs, batch {batch})"
            )
        finite = np.isfinite(ref) & np.isfinite(got)
        same_inf = ~np.isfinite(ref) & ~np.isfinite(got) & (np.sign(ref) == np.sign(got))
        diff = np.where(finite, np.abs(got - ref), np.where(same_inf, 0.0, np.inf))
        scaled = diff / np.maximum(1.0, np.where(finite, np.abs(ref), 1.0))
        records.append(
            {
                "graph": graph,
                "inputs": inputs,
                "batch": batch,
                "output": name,
                "max_abs_diff": float(diff.max()) if diff.size else 0.0,
                "max_scaled_diff": float(scaled.max()) if scaled.size else 0.0,
            }
        )
    return records


def compare_cases(cases: list[Case], sessions: dict) -> list[dict]:
    records: list[dict] = []
    for case in cases:
        got = run_case(sessions[case.graph], case)
        records += compare(case.graph, case.inputs, case.batch, case.reference, got)
    return records


def check(records: list[dict], tolerance: float) -> None:
    """Raise :class:`VerificationError` for the worst record beyond ``tolerance``."""
    bad = [r for r in records if not r["max_scaled_diff"] <= tolerance]
    if bad:
        r = max(bad, key=lambda r: r["max_scaled_diff"])
        raise VerificationError(
            f"ONNX Runtime and PyTorch disagree: {r['graph']} output '{r['output']}' max abs diff "
            f"{r['max_abs_diff']:.3g} (scaled {r['max_scaled_diff']:.3g}) > tolerance "
            f"{tolerance:g} ({r['inputs']} inputs, batch {r['batch']})"
        )


def summarize(records: list[dict]) -> dict[str, dict[str, float]]:
    """``{graph: {output: max abs difference over all checks}}``."""
    out: dict[str, dict[str, float]] = {}
    for r in records:
        slot = out.setdefault(r["graph"], {})
        slot[r["output"]] = max(slot.get(r["output"], 0.0), r["max_abs_diff"])
    return out


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


# --------------------------------------------------------------------------------------------
# Music
# --------------------------------------------------------------------------------------------


class MusicVerifier:
    """The PyTorch side of the music checks, computed once, against any ``music_step`` graph.

    ``model`` on the CPU in eval mode; ``grid`` the piano-roll grid of the MIDI comparison;
    ``primer`` an optional ``(T, 88)`` roll fed (teacher-forced) as a further rollout.
    """

    def __init__(
        self,
        model: PianoRollModel,
        grid: dict,
        *,
        batch_sizes=DEFAULT_BATCH_SIZES,
        seed: int = 0,
        steps: int = 24,
        primer: np.ndarray | None = None,
        generate_frames: int = 64,
        generate_outputs: int = 2,
    ) -> None:
        self.model, self.grid = model, grid
        self.batch_sizes, self.seed, self.steps, self.primer = (
            tuple(batch_sizes),
            seed,
            steps,
            primer,
        )
        self.params = GenerationParams(
            frames=generate_frames, seed=seed, num_outputs=generate_outputs
        )

    def _step(self, frame, h, c):
        with torch.inference_mode():
            probs, h, c = self.model.step(_t(frame), _t(h), _t(c))
        return _np(probs), _np(h), _np(c)

    def _rollout(self, b: int, rng, frames: np.ndarray | None, label: str) -> Case:
        L, H = self.model.config.num_layers, self.model.config.hidden_size
        h = c = np.zeros((L, b, H), np.float32)
        frame = np.zeros((b, N_KEYS), np.float32)
        steps = self.steps if frames is None else len(frames) + 1
        feeds, refs = [], {"probs": [], "h_out": [], "c_out": []}
        for t in range(steps):
            feeds.append({"frame": frame})
            probs, h, c = self._step(frame, h, c)
            for name, value in zip(refs, (probs, h, c), strict=True):
                refs[name].append(value)
            if frames is not None and t < len(frames):
                frame = np.broadcast_to(frames[t], (b, N_KEYS)).astype(np.float32)
            else:
                frame = (rng.random((b, N_KEYS)) < probs).astype(np.float32)
        zeros = np.zeros((L, b, H), np.float32)
        return Case(
            "music_step",
            f"{label} ({steps} steps)",
            b,
            feeds,
            {k: np.stack(v) for k, v in refs.items()},
            {"h": zeros, "c": zeros},
            {"h": "h_out", "c": "c_out"},
        )

    @cached_property
    def cases(self) -> list[Case]:
        rng = np.random.default_rng(self.seed)
        L, H = self.model.config.num_layers, self.model.config.hidden_size
        cases = []
        for b in self.batch_sizes:
            frame = rng.random((b, N_KEYS)).astype(np.float32)
            h = rng.uniform(-1, 1, (L, b, H)).astype(np.float32)
            c = (2.0 * rng.standard_normal((L, b, H))).astype(np.float32)
            probs, h1, c1 = self._step(frame, h, c)
            ref = {"probs": probs[None], "h_out": h1[None], "c_out": c1[None]}
            cases.append(Case("music_step", "random", b, [{"frame": frame}], ref, {"h": h, "c": c}))
            cases.append(self._rollout(b, rng, None, "rollout"))
            if self.primer is not None:
                cases.append(self._rollout(b, rng, self.primer, "primer rollout"))
        return cases

    @cached_property
    def reference_rolls(self) -> np.ndarray:
        stepper = TorchMusicStepper(self.model, "mean", self.seed, "cpu")
        with torch.inference_mode():
            return generate_rolls(stepper, self.params)

    def _generation(self, session) -> dict:
        ref = self.reference_rolls
        got = generate_rolls(OnnxMusicStepper(session), self.params)
        same = [midi_bytes(r, **self.grid) for r in ref] == [
            midi_bytes(g, **self.grid) for g in got
        ]
        return {
            "seed": self.seed,
            "frames": self.params.frames,
            "outputs": self.params.num_outputs,
            "midi_identical": same,
            "differing_frames": int((ref != got).any(axis=2).sum()),
        }

    def measure(self, path: str | Path, device: str = "cpu") -> dict:
        """Differences of the graph at ``path`` from PyTorch, without judging them."""
        session = make_session(path, device)
        records = compare_cases(self.cases, {"music_step": session})
        return {
            "device": device,
            "providers": session.get_providers(),
            "batch_sizes": list(self.batch_sizes),
            "max_abs_diff": summarize(records),
            "checks": records,
            "generation": self._generation(session),
        }

    def verify(self, path: str | Path, tolerance: float = DEFAULT_TOLERANCE, device="cpu") -> dict:
        """:meth:`measure`, then raise :class:`VerificationError` on any failure."""
        result = self.measure(path, device)
        check(result["checks"], tolerance)
        gen = result["generation"]
        if not gen["midi_identical"]:
            raise VerificationError(
                f"music generation from seed {gen['seed']} gives different MIDI on ONNX Runtime "
                f"and PyTorch ({gen['differing_frames']} of {gen['frames'] * gen['outputs']} "
                "frames differ)"
            )
        return {"passed": True, "tolerance": tolerance, "criterion": CRITERION, **result}


def verify_music(
    model: PianoRollModel,
    path: str | Path,
    grid: dict,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    device: str = "cpu",
    **kwargs,
) -> dict:
    """All music checks of the ``music_step`` graph at ``path``; raises on a failure."""
    return MusicVerifier(model, grid, **kwargs).verify(path, tolerance, device)


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def scene_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``(n, 3, size, size)`` preprocessed renders of the shape scenes (real-looking inputs)."""
    from training.scenes import COLOURS, SHAPES, make_scene, render_scene

    combos = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    rng = random.Random(seed)
    return np.stack(
        [preprocess(render_scene(make_scene(rng, combos), size), size) for _ in range(n)]
    )


class CaptionVerifier:
    """The PyTorch side of the caption checks, computed once, against any three graphs.

    ``images``: preprocessed real images ``(N, 3, S, S)`` (default: rendered shape scenes).
    """

    STEP_OUTPUTS = ("log_probs", "h_out", "c_out", "attention")

    def __init__(
        self,
        model: CaptionModel,
        images: np.ndarray | None = None,
        *,
        batch_sizes=DEFAULT_BATCH_SIZES,
        seed: int = 0,
        beam_size: int = 3,
    ) -> None:
        self.model, self.batch_sizes, self.seed = model, tuple(batch_sizes), seed
        if images is None:
            images = scene_images(max(self.batch_sizes), model.config.image_size, seed)
        self.images = np.ascontiguousarray(images, dtype=np.float32)
        self.beam_size = beam_size

    def _encode(self, images: np.ndarray):
        with torch.inference_mode():
            feats = self.model.encoder(_t(images))
            proj, h, c = self.model.decoder.encode_features(feats)
        return _np(feats), _np(proj), _np(h), _np(c)

    def _dec_step(self, tokens, h, c, feats, proj):
        with torch.inference_mode():
            out = self.model.decoder.step(_t(tokens), _t(h), _t(c), _t(feats), "mean", _t(proj))
        return [_np(t) for t in out]

    def _graph_cases(self, label: str, images: np.ndarray) -> tuple[list[Case], tuple]:
        b = len(images)
        feats, proj, h, c = self._encode(images)
        cases = [
            Case("caption_encoder", label, b, [{"images": images}], {"features": feats[None]}),
            Case(
                "caption_init",
                label,
                b,
                [{"features": feats}],
                {"projected": proj[None], "h": h[None], "c": c[None]},
            ),
        ]
        return cases, (feats, proj, h, c)

    @cached_property
    def cases(self) -> list[Case]:
        cfg = self.model.config
        rng = np.random.default_rng(self.seed)
        cases: list[Case] = []
        for b in self.batch_sizes:
            x = rng.standard_normal((b, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
            graph_cases, (feats, proj, _, _) = self._graph_cases("random", x)
            cases += graph_cases
            tokens = rng.integers(0, cfg.vocab_size, b).astype(np.int64)
            h = rng.uniform(-1, 1, (b, cfg.hidden_size)).astype(np.float32)
            c = (2.0 * rng.standard_normal((b, cfg.hidden_size))).astype(np.float32)
            ref = self._dec_step(tokens, h, c, feats, proj)
            cases.append(
                Case(
                    "caption_step",
                    "random",
                    b,
                    [{"tokens": tokens, "features": feats, "projected": proj}],
                    {n: r[None] for n, r in zip(self.STEP_OUTPUTS, ref, strict=True)},
                    {"h": h, "c": c},
                )
            )

            real = self.images[np.arange(b) % len(self.images)]
            graph_cases, (feats, proj, h0, c0) = self._graph_cases("real images", real)
            cases += graph_cases
            tokens = np.full(b, START_ID, dtype=np.int64)
            h, c = h0, c0
            feeds, refs = [], {n: [] for n in self.STEP_OUTPUTS}
            for _ in range(cfg.max_length):
                feeds.append({"tokens": tokens, "features": feats, "projected": proj})
                out = self._dec_step(tokens, h, c, feats, proj)
                for n, r in zip(self.STEP_OUTPUTS, out, strict=True):
                    refs[n].append(r)
                _, h, c, _ = out
                tokens = out[0].argmax(axis=1).astype(np.int64)
            cases.append(
                Case(
                    "caption_step",
                    f"real-image greedy rollout ({cfg.max_length} steps)",
                    b,
                    feeds,
                    {n: np.stack(v) for n, v in refs.items()},
                    {"h": h0, "c": c0},
                    {"h": "h_out", "c": "c_out"},
                )
            )
        return cases

    def _beam(self, stepper) -> list:
        kw = {"start_id": START_ID, "end_id": END_ID, "beam_size": self.beam_size}
        return beam_search(stepper, self.images, max_length=self.model.config.max_length, **kw)

    @cached_property
    def reference_beams(self) -> list:
        return self._beam(TorchCaptionStepper(self.model, "mean", device="cpu"))

    def _beams(self, sessions: dict) -> dict:
        got = self._beam(OnnxCaptionStepper(*(sessions[g] for g in CAPTION_GRAPHS)))
        ref = self.reference_beams
        pairs = list(zip(ref, got, strict=True))
        same = [r[0].tokens == g[0].tokens for r, g in pairs]
        lp = [abs(r[0].log_prob - g[0].log_prob) for r, g in pairs if r[0].tokens == g[0].tokens]
        return {
            "beam_size": self.beam_size,
            "images": len(pairs),
            "same_captions": int(sum(same)),
            "all_same": all(same),
            "max_log_prob_diff": float(max(lp, default=0.0)),
            "captions_torch": [r[0].tokens for r in ref],
            "captions_onnx": [g[0].tokens for g in got],
        }

    def measure(self, paths: dict[str, Path], device: str = "cpu") -> dict:
        """Differences of the three graphs from PyTorch, without judging them."""
        sessions = {g: make_session(paths[g], device) for g in CAPTION_GRAPHS}
        records = compare_cases(self.cases, sessions)
        return {
            "device": device,
            "providers": {g: s.get_providers() for g, s in sessions.items()},
            "batch_sizes": list(self.batch_sizes),
            "max_abs_diff": summarize(records),
            "checks": records,
            "beam_search": self._beams(sessions),
        }

    def verify(
        self, paths: dict[str, Path], tolerance: float = DEFAULT_TOLERANCE, device: str = "cpu"
    ) -> dict:
        """:meth:`measure`, then raise :class:`VerificationError` on any failure."""
        result = self.measure(paths, device)
        check(result["checks"], tolerance)
        beams = result["beam_search"]
        if not beams["all_same"]:
            pairs = zip(beams["captions_onnx"], beams["captions_torch"], strict=True)
            k, (a, b) = next((k, p) for k, p in enumerate(pairs) if p[0] != p[1])
            raise VerificationError(
                f"beam search gives different captions on ONNX Runtime and PyTorch for "
                f"{beams['images'] - beams['same_captions']} of {beams['images']} images "
                f"(image {k}: {a} vs {b})"
            )
        return {"passed": True, "tolerance": tolerance, "criterion": CRITERION, **result}


def verify_caption(
    model: CaptionModel,
    paths: dict[str, Path],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    device: str = "cpu",
    images: np.ndarray | None = None,
    **kwargs,
) -> dict:
    """All caption checks of the three graphs; raises on a failure."""
    return CaptionVerifier(model, images, **kwargs).verify(paths, tolerance, device)
