"""CIDEr-D as a per-caption reward, with document frequencies from the training references.

pycocoevalcap's ``Cider`` (what :func:`training.caption_metrics.score_captions` reports)
computes the IDF from the references of the captions being scored, which for a training batch
of a few dozen images is noise. Self-critical training (Rennie et al. 2017, and
ruotianluo/ImageCaptioning.pytorch's ``CiderD`` with ``coco-train-idxs``) instead fixes the
document frequencies and ``log(number of images)`` once from the whole training set.
:class:`CiderD` does that with pycocoevalcap's own n-gram counting (``precook``) and the same
formula as its ``CiderScorer.compute_cider`` (clipped tf-idf cosine per n = 1..4, Gaussian
length penalty σ = 6, mean over n and references, ×10), on captions tokenised by
:func:`training.caption_metrics.eval_tokenize`. Built on the scored set's own references it
gives pycocoevalcap's per-image scores exactly (tested), so rewards and the reported metric
are one formula.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np
from pycocoevalcap.cider.cider_scorer import precook

from bbservice.errors import ConfigError
from training.caption_metrics import eval_tokenize

__all__ = ["CiderD"]

Ngram = tuple[str, ...]


class CiderD:
    """CIDEr-D of single captions against their references, IDF fixed at construction.

    Parameters
    ----------
    references : iterable of per-image reference lists (raw caption strings, tokenised with
        ``eval_tokenize``); each image is one document for the document frequencies.
    n : longest n-gram (4).
    sigma : σ of the Gaussian length penalty (6).
    """

    def __init__(
        self, references: Iterable[Sequence[str]], *, n: int = 4, sigma: float = 6.0
    ) -> None:
        self.n, self.sigma = n, sigma
        self.document_frequency: dict[Ngram, float] = defaultdict(float)
        images = 0
        for refs in references:
            if isinstance(refs, str) or not refs:
                raise ConfigError("CiderD: every image needs a non-empty list of references")
            images += 1
            grams = {g for ref in refs for g in precook(eval_tokenize(ref), n)}
            for gram in grams:
                self.document_frequency[gram] += 1.0
        if images == 0:
            raise ConfigError("CiderD: no references to compute document frequencies from")
        self.images = images
        self.ref_len = math.log(float(images))
        self._refs_cache: dict[tuple[str, ...], list[tuple]] = {}

    def _vector(self, counts: dict[Ngram, int]) -> tuple[list[dict], np.ndarray, int]:
        """tf-idf vectors per n-gram order, their norms, and the word count (pycocoevalcap's
        ``counts2vec``)."""
        vec: list[dict[Ngram, float]] = [defaultdict(float) for _ in range(self.n)]
        norm = np.zeros(self.n)
        length = 0
        for gram, tf in counts.items():
            df = math.log(max(1.0, self.document_frequency.get(gram, 0.0)))
            k = len(gram) - 1
            vec[k][gram] = float(tf) * (self.ref_len - df)
            norm[k] += vec[k][gram] ** 2
            if k == 1:  # as pycocoevalcap: the length is counted over bigrams
                length += tf
        return vec, np.sqrt(norm), length

    def _sim(self, hyp, ref) -> np.ndarray:
        (vh, nh, lh), (vr, nr, lr) = hyp, ref
        delta = float(lh - lr)
        val = np.zeros(self.n)
        for k in range(self.n):
            for gram, weight in vh[k].items():
                r = vr[k].get(gram, 0.0)
                val[k] += min(weight, r) * r
            if nh[k] != 0 and nr[k] != 0:
                val[k] /= nh[k] * nr[k]
            val[k] *= math.exp(-(delta**2) / (2 * self.sigma**2))
        return val

    def _refs(self, refs: Sequence[str]) -> list[tuple]:
        key = tuple(refs)
        cached = self._refs_cache.get(key)
        if cached is None:
            cached = [self._vector(precook(eval_tokenize(r), self.n)) for r in refs]
            if len(self._refs_cache) > 100_000:  # a bound for very long runs
                self._refs_cache.clear()
            self._refs_cache[key] = cached
        return cached

    def score(self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
        """CIDEr-D of ``hypotheses[i]`` against ``references[i]``: ``(N,)`` float64, in
        pycocoevalcap's scale (0..10)."""
        if len(hypotheses) != len(references):
            raise ConfigError(
                f"CiderD.score: {len(hypotheses)} hypotheses but {len(references)} reference lists"
            )
        out = np.zeros(len(hypotheses))
        for i, (hyp, refs) in enumerate(zip(hypotheses, references, strict=True)):
            if isinstance(refs, str) or not refs:
                raise ConfigError(f"CiderD.score: references[{i}] must be a non-empty list")
            h = self._vector(precook(eval_tokenize(hyp), self.n))
            total = sum(self._sim(h, r) for r in self._refs(refs))
            out[i] = float(np.mean(total)) / len(refs) * 10.0
        return out
