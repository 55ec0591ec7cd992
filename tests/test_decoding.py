"""bbservice.decoding against a hand-made NumPy stepper whose sequence probabilities are known.

The toy model is a per-image Markov chain over words: the next-word distribution depends only on
the image and the previous token, so the probability of every caption is a product of table
entries and the best caption can be found by brute force.
"""

from __future__ import annotations

import itertools
import sys

import numpy as np
import pytest

from bbservice.decoding import (
    beam_search,
    greedy,
    reindex_state,
    repeat_state,
    sample,
    sample_gate_passes,
)

PAD, START, END = 0, 1, 2
A, B, C, D, E = 3, 4, 5, 6, 7
V, P = 8, 3


def table(rows: dict[int, dict[int, float]]) -> np.ndarray:
    """(V, V) next-token probabilities; unspecified previous tokens go to <end>."""
    t = np.full((V, V), 1e-9)
    t[:, END] = 1.0
    for prev, probs in rows.items():
        t[prev] = 1e-9
        for tok, p in probs.items():
            t[prev, tok] = p
    return t / t.sum(axis=1, keepdims=True)


# Greedy takes A (0.5) and then a word of a flat distribution: p(A C end) = 0.5·0.25·1 = 0.125.
# Beam search finds B end: 0.4·0.9 = 0.36.
TRAP = table(
    {
        START: {A: 0.5, B: 0.4, END: 0.1},
        A: {C: 0.25, D: 0.25, E: 0.25, B: 0.25},
        B: {END: 0.9, C: 0.1},
    }
)
# Short S end = 0.5·0.6 = 0.3 (log −1.20, per token −0.60); long C D E end
# = 0.4·0.9·0.9·0.9 = 0.29 (log −1.23, per token −0.31): a length penalty of 1 prefers it.
LENGTHY = table(
    {
        START: {A: 0.5, C: 0.4, END: 0.1},
        A: {END: 0.6, B: 0.4},
        C: {D: 0.9, END: 0.1},
        D: {E: 0.9, END: 0.1},
        E: {END: 0.9, A: 0.1},
    }
)
# A B A B ... with a small chance to stop: greedy repeats until max_length.
LOOP = table({START: {A: 0.9, END: 0.1}, A: {B: 0.9, END: 0.1}, B: {A: 0.85, END: 0.15}})
PLAIN = table({START: {C: 0.6, D: 0.3, END: 0.1}, C: {END: 0.7, E: 0.3}, D: {END: 1.0}})


class ToyStepper:
    """Per-image Markov chains; the state carries the image's table index and a step count."""

    static_keys = ("image",)

    def __init__(self, tables: list[np.ndarray]) -> None:
        self.tables = np.stack(tables)  # (I, V, V)
        self.batch_sizes: list[int] = []

    def start(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = np.asarray(images, dtype=np.int64)
        return {"image": images, "t": np.zeros((len(images), 1), np.float32)}

    def step(self, tokens, state):
        self.batch_sizes.append(len(tokens))
        probs = self.tables[state["image"], tokens]  # (N, V)
        t = state["t"][:, 0].astype(np.int64)
        attention = np.zeros((len(tokens), P), np.float32)
        attention[np.arange(len(tokens)), t % P] = 1.0
        return np.log(probs).astype(np.float32), dict(state, t=state["t"] + 1), attention


def seq_log_prob(tab: np.ndarray, words: list[int]) -> float:
    prev, total = START, 0.0
    for w in [*words, END]:
        total += np.log(tab[prev, w])
        prev = w
    return float(total)


def brute_force_best(tab: np.ndarray, max_words: int) -> list[int]:
    best, best_lp = None, -np.inf
    for n in range(max_words + 1):
        for words in itertools.product(range(3, V), repeat=n):
            lp = seq_log_prob(tab, list(words))
            if lp > best_lp:
                best, best_lp = list(words), lp
    return best


KW = {"start_id": START, "end_id": END}


def test_greedy_follows_the_argmax_and_reports_log_prob_attention_entropy():
    stepper = ToyStepper([TRAP, PLAIN])
    h0, h1 = greedy(stepper, [0, 1], max_length=10, **KW)
    assert h0.tokens == [A, B] and h0.finished  # A, then the first of four tied words (B)
    assert h1.tokens == [C]
    assert h0.log_prob == pytest.approx(seq_log_prob(TRAP, [A, B]), abs=1e-5)
    assert h1.log_prob == pytest.approx(seq_log_prob(PLAIN, [C]), abs=1e-5)
    assert h0.attention.shape == (2, P) and h0.attention[1, 1] == 1.0  # map of the 2nd word
    assert h0.entropy.shape == (3,)  # two words + <end>
    assert h0.entropy[1] == pytest.approx(np.log(4), abs=1e-4)  # flat over four words


def test_beam_finds_the_sequence_greedy_misses():
    stepper = ToyStepper([TRAP])
    assert greedy(stepper, [0], max_length=5, **KW)[0].tokens != [B]
    best = beam_search(stepper, [0], beam_size=2, max_length=5, **KW)[0][0]
    assert best.tokens == [B] == brute_force_best(TRAP, 3)
    assert best.log_prob == pytest.approx(np.log(0.36), abs=1e-5) and best.finished


def test_batch_beam_equals_per_item_beam_and_finished_items_leave_the_batch():
    tables = [TRAP, LENGTHY, LOOP, PLAIN]
    images = [0, 1, 2, 3, 1]
    stepper = ToyStepper(tables)
    batched = beam_search(stepper, images, beam_size=3, max_length=6, n_best=3, **KW)
    for img, got in zip(images, batched, strict=True):
        alone = beam_search(ToyStepper(tables), [img], beam_size=3, max_length=6, n_best=3, **KW)
        assert [h.tokens for h in got] == [h.tokens for h in alone[0]]
        np.testing.assert_allclose([h.log_prob for h in got], [h.log_prob for h in alone[0]])
    assert stepper.batch_sizes[0] == 3 * len(images)
    assert stepper.batch_sizes[-1] < stepper.batch_sizes[0]  # early-stopped items dropped out


def test_n_best_is_sorted_with_exact_log_probs():
    for tab in (TRAP, LENGTHY, PLAIN):
        hyps = beam_search(ToyStepper([tab]), [0], beam_size=4, n_best=4, max_length=6, **KW)[0]
        assert len(hyps) == 4
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == 4
        for h in hyps:
            assert h.log_prob == pytest.approx(seq_log_prob(tab, h.tokens), abs=1e-4)
            assert h.attention.shape == (len(h.tokens), P)
        assert hyps[0].tokens == brute_force_best(tab, 4)


class LateEnd(ToyStepper):
    """<end> is (almost) impossible before the sixth word: long captions win."""

    def step(self, tokens, state):
        lp, new_state, att = super().step(tokens, state)
        early = state["t"][:, 0] < 6
        lp[early, END] = -30.0
        return lp, new_state, att


def test_no_repeated_trigrams_when_blocked():
    free = beam_search(LateEnd([LOOP]), [0], beam_size=2, max_length=8, **KW)[0][0]
    assert free.tokens[:6] == [A, B, A, B, A, B]  # the loop itself repeats trigrams
    blocked = beam_search(
        LateEnd([LOOP]),
        [0],
        beam_size=3,
        n_best=3,
        max_length=8,
        block_repeated_trigrams=True,
        **KW,
    )[0]
    assert len(blocked) == 3
    for h in blocked:
        trigrams = [tuple(h.tokens[i : i + 3]) for i in range(len(h.tokens) - 2)]
        assert len(trigrams) == len(set(trigrams)), h.tokens


def test_length_penalty_prefers_longer_captions():
    stepper = ToyStepper([LENGTHY])
    plain = beam_search(stepper, [0], beam_size=3, max_length=8, **KW)[0][0]
    assert plain.tokens == [A]
    longer = beam_search(stepper, [0], beam_size=3, max_length=8, length_penalty=1.0, **KW)[0][0]
    assert longer.tokens == [C, D, E]
    assert longer.score == pytest.approx(longer.log_prob / 4)


def test_max_length_cuts_and_forces_end():
    stepper = ToyStepper([LOOP])
    g = greedy(stepper, [0], max_length=4, **KW)[0]
    assert g.tokens == [A, B, A, B] and not g.finished
    assert g.log_prob == pytest.approx(seq_log_prob(LOOP, [A, B, A, B]), abs=1e-5)
    for h in beam_search(stepper, [0], beam_size=3, n_best=3, max_length=4, **KW)[0]:
        assert len(h.tokens) <= 4
    assert len(stepper.batch_sizes) <= 2 * 5 + 5  # never more than max_length + 1 steps a call


def test_sampling_is_seeded_and_respects_top_k():
    tables = [TRAP, LENGTHY]
    a = sample(ToyStepper(tables), [0, 1], n_samples=20, rng=3, max_length=6, **KW)
    b = sample(ToyStepper(tables), [0, 1], n_samples=20, rng=3, max_length=6, **KW)
    c = sample(ToyStepper(tables), [0, 1], n_samples=20, rng=4, max_length=6, **KW)
    as_tokens = lambda res: [[h.tokens for h in per] for per in res]  # noqa: E731
    assert as_tokens(a) == as_tokens(b) != as_tokens(c)
    assert len(a) == 2 and all(len(per) == 20 for per in a)
    for h in a[0]:
        assert h.log_prob == pytest.approx(seq_log_prob(TRAP, h.tokens), abs=1e-4)
    # top-k = 1 is greedy; with top-k = 2 every word is among the two most probable.
    top1 = sample(ToyStepper([PLAIN]), [0], n_samples=5, top_k=1, rng=0, max_length=6, **KW)
    assert all(h.tokens == [C] for h in top1[0])
    top2 = sample(ToyStepper([LENGTHY]), [0], n_samples=200, top_k=2, rng=0, max_length=6, **KW)
    for h in top2[0]:
        prev = START
        for w in [*h.tokens, END] if h.finished else h.tokens:
            assert w in np.argsort(-LENGTHY[prev])[:2]
            prev = w
    firsts = {h.tokens[0] for h in top2[0] if h.tokens}
    assert firsts == {A, C}  # both top-2 first words get drawn, <end> (third) never


def test_temperature_sharpens():
    cold = sample(ToyStepper([TRAP]), [0], n_samples=100, temperature=0.05, rng=1, **KW)[0]
    assert all(h.tokens[:1] == [A] for h in cold)


def test_gate_passes_count_distinct_captions():
    class Noisy(ToyStepper):
        """Each row draws its own noise: a stand-in for sampled gates."""

        def __init__(self):
            super().__init__([TRAP])
            self.rng = np.random.default_rng(0)

        def step(self, tokens, state):
            lp, state, att = super().step(tokens, state)
            lp = lp + self.rng.normal(0, 1.0, lp.shape)
            lp -= np.log(np.exp(lp).sum(axis=1, keepdims=True))
            return lp.astype(np.float32), state, att

    res = sample_gate_passes(Noisy(), [0, 0], passes=12, max_length=5, **KW)
    assert len(res) == 2
    for r in res:
        assert sum(count for _, count in r.captions) == r.passes == 12
        counts = [count for _, count in r.captions]
        assert counts == sorted(counts, reverse=True)
        assert r.disagreement == pytest.approx(1 - counts[0] / 12)
        assert r.mean_entropy > 0
    still = sample_gate_passes(ToyStepper([TRAP]), [0], passes=5, beam_size=2, max_length=5, **KW)
    assert still[0].captions == [((B,), 5)] and still[0].disagreement == 0.0


def test_state_helpers():
    state = {"x": np.arange(6).reshape(3, 2), "s": np.arange(3)}
    rep = repeat_state(state, 2)
    assert rep["s"].tolist() == [0, 0, 1, 1, 2, 2]
    sub = reindex_state(rep, np.array([5, 0]), skip=("s",))
    assert sub["x"].tolist() == [[4, 5], [0, 1]] and sub["s"].shape == (6,)


def test_argument_errors():
    with pytest.raises(ValueError, match="n_best"):
        beam_search(ToyStepper([TRAP]), [0], beam_size=2, n_best=3, **KW)
    with pytest.raises(ValueError, match="max_length"):
        greedy(ToyStepper([TRAP]), [0], max_length=0, **KW)
    with pytest.raises(ValueError, match="temperature"):
        sample(ToyStepper([TRAP]), [0], temperature=0, **KW)


def test_decoding_module_does_not_import_torch():
    import subprocess

    code = "import sys, bbservice.decoding; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# -- diverse beam search ---------------------------------------------------------------------

# Three equally good one-word captions: plain beams all agree on the first, diverse ones spread.
FAN = table({START: {A: 0.3, B: 0.3, C: 0.3, END: 0.1}, A: {END: 0.9, D: 0.1}})


def test_one_group_is_plain_beam_search_whatever_the_diversity():
    tables = [TRAP, LENGTHY, LOOP, PLAIN, FAN]
    for kw in ({}, {"length_penalty": 1.0}, {"block_repeated_trigrams": True}):
        plain = beam_search(ToyStepper(tables), range(5), beam_size=3, n_best=3, **kw, **KW)
        one = beam_search(
            ToyStepper(tables), range(5), beam_size=3, n_best=3, groups=1, diversity=4.0, **kw, **KW
        )
        assert [[h.tokens for h in hs] for hs in one] == [[h.tokens for h in hs] for hs in plain]
        assert [[h.score for h in hs] for hs in one] == [[h.score for h in hs] for hs in plain]


def test_groups_without_diversity_repeat_the_same_search():
    # Two groups of two beams and no penalty: each group is a beam search of size 2.
    for tab in (TRAP, LENGTHY, PLAIN):
        two = beam_search(ToyStepper([tab]), [0], beam_size=4, groups=2, n_best=2, **KW)[0]
        alone = beam_search(ToyStepper([tab]), [0], beam_size=2, n_best=1, **KW)[0][0]
        assert [h.tokens for h in two] == [alone.tokens, alone.tokens]
        assert two[0].log_prob == pytest.approx(alone.log_prob)


def test_diversity_penalty_is_hamming_and_stays_out_of_the_scores():
    # Group 0 takes A (0.5); group 1 pays 10 for A and takes B, then <end>: p = 0.4·0.9.
    kw = {"beam_size": 2, "groups": 2, "n_best": 2, **KW}
    hyps = beam_search(ToyStepper([TRAP]), [0], diversity=10.0, **kw)[0]
    assert [h.tokens[:1] for h in hyps] == [[B], [A]]  # ranked by the model's score
    assert hyps[0].tokens == [B] and hyps[0].log_prob == pytest.approx(np.log(0.36), abs=1e-5)
    assert hyps[1].log_prob == pytest.approx(seq_log_prob(TRAP, hyps[1].tokens), abs=1e-5)
    for h in hyps:
        assert h.score == pytest.approx(h.log_prob)
    # A small penalty (below log 0.5 − log 0.4 = 0.22) leaves both groups on A.
    weak = beam_search(ToyStepper([TRAP]), [0], diversity=0.1, **kw)[0]
    assert [h.tokens[:1] for h in weak] == [[A], [A]]


def test_diversity_spreads_the_groups_over_distinct_words():
    same = beam_search(ToyStepper([FAN]), [0], beam_size=3, groups=3, n_best=3, **KW)[0]
    assert len({tuple(h.tokens) for h in same}) == 1
    diverse = beam_search(
        ToyStepper([FAN]), [0], beam_size=3, groups=3, n_best=3, diversity=1.0, **KW
    )[0]
    assert sorted(h.tokens for h in diverse) == [[A], [B], [C]]


def random_tables(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    tabs = rng.dirichlet(np.full(V, 0.6), size=(n, V))
    tabs[:, :, [PAD, START]] = 1e-9  # words and <end> only
    return list(tabs / tabs.sum(axis=2, keepdims=True))


def shared_tokens(hyps) -> int:
    """(position, word) pairs that two groups' captions have in common."""
    seen, shared = set(), 0
    for h in hyps:
        mine = set(enumerate(h.tokens))
        shared += len(mine & seen)
        seen |= mine
    return shared


def test_diversity_reduces_duplicate_tokens_across_groups_on_random_chains():
    tables = random_tables(12, seed=0)
    kw = {"beam_size": 6, "groups": 3, "n_best": 3, "max_length": 6, **KW}
    plain = beam_search(ToyStepper(tables), range(12), **kw)
    diverse = beam_search(ToyStepper(tables), range(12), diversity=2.0, **kw)
    assert sum(map(shared_tokens, diverse)) < sum(map(shared_tokens, plain)) / 2
    for tab, hs in zip(tables, diverse, strict=True):  # still exact model log-probabilities
        for h in hs:
            if h.finished:
                assert h.log_prob == pytest.approx(seq_log_prob(tab, h.tokens), abs=1e-4)


def test_diverse_batch_equals_one_by_one():
    tables = [*random_tables(4, seed=1), TRAP, FAN]
    kw = {"beam_size": 4, "groups": 2, "n_best": 3, "diversity": 0.7, "max_length": 6, **KW}
    stepper = ToyStepper(tables)
    batched = beam_search(stepper, range(len(tables)), **kw)
    for img, got in enumerate(batched):
        alone = beam_search(ToyStepper(tables), [img], **kw)[0]
        assert [h.tokens for h in got] == [h.tokens for h in alone]
        np.testing.assert_allclose([h.log_prob for h in got], [h.log_prob for h in alone])
    assert stepper.batch_sizes[0] == 4 * len(tables)


def test_diverse_argument_errors():
    with pytest.raises(ValueError, match="groups .3. must divide beam_size .4."):
        beam_search(ToyStepper([TRAP]), [0], beam_size=4, groups=3, **KW)
    with pytest.raises(ValueError, match="groups must be >= 1"):
        beam_search(ToyStepper([TRAP]), [0], beam_size=4, groups=0, **KW)
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="diversity must be"):
            beam_search(ToyStepper([TRAP]), [0], beam_size=4, groups=2, diversity=bad, **KW)
