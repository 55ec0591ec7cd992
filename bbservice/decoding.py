"""Caption decoding over a step function: greedy, batched beam search, sampling, gate sampling.

NumPy only (no torch): the same code drives the PyTorch model
(:class:`bbservice.models.caption.TorchCaptionStepper`) and ONNX Runtime sessions.

The step interface (:class:`Stepper`)
-------------------------------------
``start(inputs) -> state``: a dict of arrays, batch on axis 0 (one row per image).
``step(tokens (N,) int64, state) -> (log_probs (N, V) float32, new_state, attention (N, P))``.
States are reordered with ``np.take(axis=0)``; keys named in the stepper's optional
``static_keys`` (per-image constants such as the encoder features) are repeated once per row at
the start and afterwards reordered only when rows are dropped, never when beams swap places
(beams of one image share them).

Conventions
-----------
* :class:`Hypothesis` ``tokens`` are word ids without ``<start>``/``<end>``; ``log_prob`` is
  the model's total log-probability of those words and of the final ``<end>``; ``attention``
  holds one (P,) map per word; ``entropy`` the entropy (nats) of the next-word distribution at
  every decision (one per word, plus one for ``<end>``).
* ``max_length`` is the most words a caption may have: after that many words ``<end>`` is
  forced (its log-probability still counts) and the hypothesis has ``finished=False``;
  ``finished=True`` means the model chose to stop.
* Length penalty ``a``: hypotheses are ranked by ``log_prob / n**a`` with ``n`` = words + 1
  (the ``<end>``); ``a = 0`` ranks by total log-probability, ``a > 0`` favours longer captions.
* Diverse beam search (Vijayakumar et al. 2016, "Diverse Beam Search"): ``groups`` G splits the
  ``beam_size`` beams into G groups of ``beam_size / G``; at every step the groups choose in
  turn, and a word already chosen at this step by ``c`` beams of earlier groups costs
  ``diversity · c`` (Hamming diversity) in the choice only: ``log_prob`` and ``score`` stay
  the model's. ``groups=1`` is plain beam search.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

__all__ = [
    "GateSampleResult",
    "Hypothesis",
    "Stepper",
    "beam_search",
    "greedy",
    "reindex_state",
    "repeat_state",
    "sample",
    "sample_gate_passes",
]

State = dict[str, np.ndarray]


class Stepper(Protocol):
    """A decoding backend (see the module docstring)."""

    def start(self, inputs: Any) -> State: ...

    def step(self, tokens: np.ndarray, state: State) -> tuple[np.ndarray, State, np.ndarray]: ...


@dataclass
class Hypothesis:
    """One decoded caption (see the module docstring for the conventions)."""

    tokens: list[int]
    log_prob: float
    attention: np.ndarray  # (len(tokens), P)
    entropy: np.ndarray  # (len(tokens) + 1,)
    finished: bool  # False: cut at max_length words
    score: float = 0.0  # ranking score, log_prob / n**length_penalty


@dataclass
class GateSampleResult:
    """Stochastic-gate passes over one image.

    ``captions``: the distinct token sequences with their counts, most frequent first (ties:
    the higher mean log-probability first). ``disagreement`` = 1 − (count of the most frequent
    caption) / passes: 0 when every pass agrees. ``mean_entropy``: the entropy of the next-word
    distribution averaged over the decisions of each pass, then over passes (nats).
    """

    captions: list[tuple[tuple[int, ...], int]]
    hypotheses: list[Hypothesis] = field(repr=False)
    disagreement: float
    mean_entropy: float

    @property
    def passes(self) -> int:
        return len(self.hypotheses)


# --------------------------------------------------------------------------------------------
# State helpers
# --------------------------------------------------------------------------------------------


def reindex_state(state: Mapping[str, np.ndarray], index: np.ndarray, skip=()) -> State:
    """Rows ``index`` of every array (``np.take(axis=0)``), except the keys in ``skip``."""
    return {k: v if k in skip else np.take(v, index, axis=0) for k, v in state.items()}


def repeat_state(state: Mapping[str, np.ndarray], n: int) -> State:
    """Each row repeated ``n`` times: row ``b`` becomes rows ``b·n .. b·n + n − 1``."""
    return {k: np.repeat(v, n, axis=0) for k, v in state.items()}


def _batch_size(state: Mapping[str, np.ndarray]) -> int:
    sizes = {v.shape[0] for v in state.values()}
    if len(sizes) != 1:
        raise ValueError(f"state arrays disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


def _entropy(log_probs: np.ndarray) -> np.ndarray:
    """Entropy in nats of each row of log-probabilities: ``(N, V) -> (N,)``."""
    lp = np.where(np.isfinite(log_probs), log_probs, 0.0)
    return -(np.exp(log_probs) * lp).sum(axis=-1)


def _score(log_prob: float, n_tokens: int, length_penalty: float) -> float:
    return log_prob / max(n_tokens, 1) ** length_penalty if length_penalty else log_prob


def _check(max_length: int, **positive: int) -> None:
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


# --------------------------------------------------------------------------------------------
# Greedy and sampling: one row per caption, rows leave the batch when they finish
# --------------------------------------------------------------------------------------------


def _decode_rows(
    stepper: Stepper,
    state: State,
    choose,
    start_id: int,
    end_id: int,
    max_length: int,
) -> list[Hypothesis]:
    """Run rows until each emits ``end_id`` (forced after ``max_length`` words).

    ``choose(log_probs (n, V), rows (n,)) -> tokens (n,)`` picks the next token of each live row.
    """
    n = _batch_size(state)
    words: list[list[int]] = [[] for _ in range(n)]
    maps: list[list[np.ndarray]] = [[] for _ in range(n)]
    ents: list[list[float]] = [[] for _ in range(n)]
    total = np.zeros(n)
    finished = np.zeros(n, dtype=bool)
    rows = np.arange(n)  # original row of each live row
    tokens = np.full(n, start_id, dtype=np.int64)
    n_positions = 0
    for t in range(max_length + 1):
        log_probs, state, attention = stepper.step(tokens, state)
        n_positions = attention.shape[1]
        chosen = np.asarray(choose(log_probs, rows), dtype=np.int64)
        natural_end = chosen == end_id
        if t == max_length:
            chosen = np.full_like(chosen, end_id)  # max_length words: <end> is forced
        picked = log_probs[np.arange(len(rows)), chosen].astype(np.float64)
        entropy = _entropy(log_probs.astype(np.float64))
        keep = []
        for j, r in enumerate(rows):
            total[r] += picked[j]
            ents[r].append(float(entropy[j]))
            if chosen[j] == end_id:
                finished[r] = natural_end[j]
                continue
            words[r].append(int(chosen[j]))
            maps[r].append(attention[j])
            keep.append(j)
        if not keep:
            break
        keep = np.asarray(keep, dtype=np.int64)
        if keep.size < len(rows):
            state = reindex_state(state, keep)
        rows, tokens = rows[keep], chosen[keep]
    return [
        Hypothesis(
            tokens=words[r],
            log_prob=float(total[r]),
            attention=np.stack(maps[r]) if maps[r] else np.zeros((0, n_positions), np.float32),
            entropy=np.asarray(ents[r]),
            finished=bool(finished[r]),
            score=float(total[r]),
        )
        for r in range(n)
    ]


def greedy(
    stepper: Stepper, inputs: Any, *, start_id: int, end_id: int, max_length: int = 20
) -> list[Hypothesis]:
    """The most probable next word at every step; one :class:`Hypothesis` per image."""
    _check(max_length)
    return _greedy_from_state(stepper, stepper.start(inputs), start_id, end_id, max_length)


def _greedy_from_state(stepper, state, start_id, end_id, max_length) -> list[Hypothesis]:
    def choose(log_probs: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return log_probs.argmax(axis=1)

    return _decode_rows(stepper, state, choose, start_id, end_id, max_length)


def sample(
    stepper: Stepper,
    inputs: Any,
    *,
    start_id: int,
    end_id: int,
    n_samples: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    max_length: int = 20,
    rng: np.random.Generator | int | None = None,
) -> list[list[Hypothesis]]:
    """Ancestral sampling: ``n_samples`` captions per image drawn from ``softmax(log p / T)``.

    ``top_k > 0`` keeps only the k most probable words at each step (ties with the k-th too).
    ``rng`` (a NumPy Generator or a seed) makes the draws reproducible. ``log_prob`` stays the
    model's own (temperature-free) log-probability. Returns, per image, its samples in draw
    order.
    """
    _check(max_length, n_samples=n_samples)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    state = stepper.start(inputs)
    n_images = _batch_size(state)
    state = repeat_state(state, n_samples)

    def choose(log_probs: np.ndarray, rows: np.ndarray) -> np.ndarray:
        logits = log_probs.astype(np.float64) / temperature
        if 0 < top_k < logits.shape[1]:
            kth = np.partition(logits, -top_k, axis=1)[:, -top_k][:, None]
            logits = np.where(logits >= kth, logits, -np.inf)
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        cum = np.cumsum(probs, axis=1)
        u = gen.random(len(rows))[:, None] * cum[:, -1:]
        return np.minimum((cum <= u).sum(axis=1), logits.shape[1] - 1)

    hyps = _decode_rows(stepper, state, choose, start_id, end_id, max_length)
    return [hyps[b * n_samples : (b + 1) * n_samples] for b in range(n_images)]


# --------------------------------------------------------------------------------------------
# Beam search over the whole batch
# --------------------------------------------------------------------------------------------


def _trigram_bans(history: np.ndarray) -> list[tuple[int, list[int]]]:
    """For beams ``(R, t)`` of word ids: (row, words that would repeat a trigram) pairs."""
    bans = []
    if history.shape[1] < 2:
        return bans
    for r, seq in enumerate(history.tolist()):
        last = (seq[-2], seq[-1])
        words = [seq[i + 2] for i in range(len(seq) - 2) if (seq[i], seq[i + 1]) == last]
        if words:
            bans.append((r, words))
    return bans


def beam_search(
    stepper: Stepper,
    inputs: Any,
    *,
    start_id: int,
    end_id: int,
    beam_size: int = 3,
    max_length: int = 20,
    length_penalty: float = 0.0,
    n_best: int = 1,
    block_repeated_trigrams: bool = False,
    groups: int = 1,
    diversity: float = 0.0,
) -> list[list[Hypothesis]]:
    """Beam search over a whole batch at once; per image its ``n_best`` hypotheses, best first.

    Every step scores all ``beam_size × V`` continuations of an image's live beams; of the
    best ``2·beam_size``, those ending in ``<end>`` that rank within the first ``beam_size``
    become finished hypotheses and the best ``beam_size`` others the next live beams. An image
    stops once ``n_best`` hypotheses have finished and no live beam can still outscore the
    n-th best (log-probabilities only fall; with a length penalty the bound assumes the most
    favourable length, so a positive penalty searches up to ``max_length``); its rows then
    leave the batch. Beams still live after ``max_length`` words get a forced ``<end>``
    (``finished=False``). With ``block_repeated_trigrams`` no beam may produce a word trigram
    it already contains.

    Diverse beam search: ``groups`` G > 1 (it must divide ``beam_size``) runs G searches of
    ``beam_size / G`` beams each, every one started from ``<start>``, that choose in turn at
    every step; group g's candidates ending in word w are ranked by ``log_prob − diversity ·
    (beams of groups < g that chose w at this step)``. Each group keeps its own finished
    hypotheses and stops as above for its share ``ceil(n_best / G)``; the answer is the best
    ``n_best`` of every group's best share, by ``score`` (the penalty is never part of it).
    Groups may still end in the same caption (more so with a small ``diversity``).
    """
    _check(max_length, beam_size=beam_size, n_best=n_best, groups=groups)
    if n_best > beam_size:
        raise ValueError(f"n_best ({n_best}) cannot exceed beam_size ({beam_size})")
    if beam_size % groups:
        raise ValueError(
            f"groups ({groups}) must divide beam_size ({beam_size}): every group gets "
            "beam_size / groups beams"
        )
    if not np.isfinite(diversity) or diversity < 0:
        raise ValueError(f"diversity must be a finite number >= 0, got {diversity}")
    state = stepper.start(inputs)
    return _beam_from_state(
        stepper,
        state,
        start_id,
        end_id,
        beam_size,
        max_length,
        length_penalty,
        n_best,
        block_repeated_trigrams,
        groups,
        float(diversity),
    )


def _beam_from_state(
    stepper: Stepper,
    state: State,
    start_id: int,
    end_id: int,
    K: int,
    max_length: int,
    length_penalty: float,
    n_best: int,
    block_trigrams: bool,
    groups: int = 1,
    diversity: float = 0.0,
) -> list[list[Hypothesis]]:
    static = tuple(getattr(stepper, "static_keys", ()))
    n_images = _batch_size(state)
    state = repeat_state(state, K)  # row b·K + k; group g holds beams g·Kg .. g·Kg + Kg − 1
    G = groups
    Kg = K // G
    share = -(-n_best // G)  # finished hypotheses each group must have before it may stop
    items = np.arange(n_images)  # original image of each live item
    B = n_images
    beam_lp = np.full((B, K), -np.inf)
    beam_lp[:, ::Kg] = 0.0  # one beam per group is alive before the first word
    hist = np.zeros((B, K, 0), dtype=np.int64)  # words so far
    hist_att: np.ndarray | None = None  # (B, K, t, P)
    hist_ent = np.zeros((B, K, 0))
    tokens = np.full(B * K, start_id, dtype=np.int64)
    pools: list[list[list[Hypothesis]]] = [[[] for _ in range(G)] for _ in range(n_images)]

    def ended(b: int, k: int, lp: float, last_entropy: float, natural: bool) -> Hypothesis:
        """Beam (b, k) followed by <end>, with total log-probability ``lp``."""
        words = hist[b, k].tolist()
        return Hypothesis(
            tokens=words,
            log_prob=float(lp),
            attention=hist_att[b, k],
            entropy=np.append(hist_ent[b, k], last_entropy),
            finished=natural,
            score=_score(float(lp), len(words) + 1, length_penalty),
        )

    for t in range(max_length + 1):
        log_probs, state, attention = stepper.step(tokens, state)
        V, P = log_probs.shape[1], attention.shape[1]
        lp = log_probs.astype(np.float64).reshape(B, K, V)
        ent = _entropy(lp)  # (B, K)
        att = attention.reshape(B, K, P)
        if hist_att is None:
            hist_att = np.zeros((B, K, 0, P), dtype=attention.dtype)
        if block_trigrams:
            for r, words in _trigram_bans(hist.reshape(B * K, -1)):
                lp[r // K, r % K, words] = -np.inf
        natural = np.ones((B, K), dtype=bool)
        if t == max_length:  # max_length words already: <end> is forced
            natural = lp.argmax(axis=2) == end_id
            keep_end = lp[:, :, end_id].copy()
            lp[:] = -np.inf
            lp[:, :, end_id] = keep_end

        new_src = np.zeros((B, K), dtype=np.int64)
        new_tok = np.full((B, K), end_id, dtype=np.int64)
        new_lp = np.full((B, K), -np.inf)
        done = np.ones(B, dtype=bool)
        chosen = np.zeros((B, V))  # beams of earlier groups that chose each word at this step
        for g in range(G):
            lo = g * Kg
            cand = (beam_lp[:, lo : lo + Kg, None] + lp[:, lo : lo + Kg]).reshape(B, Kg * V)
            rank_by = cand
            if g and diversity:
                rank_by = cand - diversity * np.tile(chosen, Kg)  # (B, Kg·V), word = j mod V
            n_cand = min(2 * Kg, Kg * V)
            top = np.argpartition(-rank_by, n_cand - 1, axis=1)[:, :n_cand]
            order = np.argsort(-np.take_along_axis(rank_by, top, axis=1), axis=1, kind="stable")
            top = np.take_along_axis(top, order, axis=1)  # (B, 2·Kg) best first
            for b in range(B):
                pool = pools[items[b]][g]
                live = 0
                for rank, j in enumerate(top[b]):
                    score = cand[b, j]
                    if not np.isfinite(score):
                        break
                    k, w = divmod(int(j), V)
                    k += lo
                    if w == end_id:
                        if rank < Kg:
                            pool.append(ended(b, k, score, ent[b, k], bool(natural[b, k])))
                        continue
                    new_src[b, lo + live], new_tok[b, lo + live] = k, w
                    new_lp[b, lo + live] = score
                    live += 1
                    if live == Kg:
                        break
                group_lp = new_lp[b, lo : lo + Kg]
                if _item_done(pool, group_lp, t + 1, share, max_length, length_penalty):
                    group_lp[:] = -np.inf  # this group is finished: its beams go quiet
                else:
                    done[b] = False
            if G > 1:
                alive = np.isfinite(new_lp[:, lo : lo + Kg])
                rows, cols = np.nonzero(alive)
                np.add.at(chosen, (rows, new_tok[:, lo : lo + Kg][rows, cols]), 1.0)

        # Reorder the beams' histories and states; drop finished images.
        bk = np.arange(B)[:, None]
        hist = np.concatenate([hist[bk, new_src], new_tok[:, :, None]], axis=2)
        hist_att = np.concatenate([hist_att[bk, new_src], att[bk, new_src][:, :, None]], axis=2)
        hist_ent = np.concatenate([hist_ent[bk, new_src], ent[bk, new_src][:, :, None]], axis=2)
        beam_lp = new_lp
        rows = (bk * K + new_src).reshape(-1)
        state = reindex_state(state, rows, skip=static)
        tokens = new_tok.reshape(-1)
        if done.any():
            keep = np.flatnonzero(~done)
            if keep.size == 0:
                break
            keep_rows = (keep[:, None] * K + np.arange(K)).reshape(-1)
            state = reindex_state(state, keep_rows)
            items, beam_lp, tokens = items[keep], beam_lp[keep], tokens[keep_rows]
            hist, hist_att, hist_ent = hist[keep], hist_att[keep], hist_ent[keep]
            B = len(keep)
    # Every image ends by step max_length + 1 (only <end> is allowed there).
    results = []
    for per_group in pools:
        best = [h for pool in per_group for h in sorted(pool, key=lambda h: -h.score)[:share]]
        results.append(sorted(best, key=lambda h: -h.score)[:n_best])
    return results


def _item_done(
    pool: list[Hypothesis],
    live_lp: np.ndarray,
    n_words: int,
    n_best: int,
    max_length: int,
    length_penalty: float,
) -> bool:
    """Whether an image's search can stop (see :func:`beam_search`)."""
    if not np.isfinite(live_lp).any():
        return True
    if len(pool) < n_best:
        return False
    nth = sorted((h.score for h in pool), reverse=True)[n_best - 1]
    best_live = float(np.max(live_lp))  # every future log-probability is <= this
    if length_penalty > 0:  # most favourable: the longest caption (n = max_length + 1 tokens)
        bound = best_live / (max_length + 1) ** length_penalty
    elif length_penalty < 0:  # most favourable: the shortest (one more token, <end>)
        bound = best_live / (n_words + 1) ** length_penalty
    else:
        bound = best_live
    return bound <= nth


# --------------------------------------------------------------------------------------------
# Stochastic-gate passes
# --------------------------------------------------------------------------------------------


def sample_gate_passes(
    stepper: Stepper,
    inputs: Any,
    *,
    passes: int,
    start_id: int,
    end_id: int,
    beam_size: int = 1,
    max_length: int = 20,
    length_penalty: float = 0.0,
) -> list[GateSampleResult]:
    """``passes`` decodes per image with a stepper that samples its gates (``gate_mode="sample"``).

    The image is encoded once; its state is repeated ``passes`` times and every row decodes
    greedily (``beam_size=1``) or with beam search inside the pass. The stepper draws fresh gate
    noise for every row and step, so the rows are independent passes. Returns one
    :class:`GateSampleResult` per image.
    """
    _check(max_length, passes=passes, beam_size=beam_size)
    state = stepper.start(inputs)
    n_images = _batch_size(state)
    state = repeat_state(state, passes)
    if beam_size == 1:
        hyps = _greedy_from_state(stepper, state, start_id, end_id, max_length)
    else:
        hyps = [
            best[0]
            for best in _beam_from_state(
                stepper, state, start_id, end_id, beam_size, max_length, length_penalty, 1, False
            )
        ]
    results = []
    for b in range(n_images):
        mine = hyps[b * passes : (b + 1) * passes]
        counts = Counter(tuple(h.tokens) for h in mine)
        mean_lp = {
            seq: float(np.mean([h.log_prob for h in mine if tuple(h.tokens) == seq]))
            for seq in counts
        }
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], -mean_lp[kv[0]]))
        entropies = [float(h.entropy.mean()) for h in mine if h.entropy.size]
        results.append(
            GateSampleResult(
                captions=ranked,
                hypotheses=mine,
                disagreement=1.0 - ranked[0][1] / passes,
                mean_entropy=float(np.mean(entropies)) if entropies else 0.0,
            )
        )
    return results
