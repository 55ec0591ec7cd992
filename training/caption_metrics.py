"""Caption metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D with pycocoevalcap's scorers.

The Java PTBTokenizer of the COCO evaluation is replaced by `eval_tokenize`, a pure-Python
approximation: lowercase, split off punctuation and English clitics ("dog's" -> "dog 's",
"don't" -> "do n't"), then drop the tokens in PTBTokenizer's PUNCTUATIONS list (brackets and
double quotes too). Scores therefore match the official ones closely but not bit for bit.

Notes
-----
* Scores are on pycocoevalcap's scale: BLEU, METEOR, ROUGE-L in [0, 1]; CIDEr-D in [0, 10]
  (papers usually print x100).
* pycocoevalcap's ``Cider`` is CIDEr-D (clipped n-gram counts, Gaussian length penalty with
  sigma = 6, x10) with IDF computed from the references of the images being scored, so it
  depends on the whole evaluated set; on a single image IDF is log(1) - log(1) = 0 and
  CIDEr-D is always 0.
* METEOR runs only if ``java`` is on PATH and pycocoevalcap ships ``meteor-1.5.jar``; on any
  failure (or after `meteor_timeout` seconds) it is left out of the result, never raised.
"""

from __future__ import annotations

import re
import shutil
import threading
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from bbservice.errors import ConfigError

__all__ = [
    "PTB_PUNCTUATIONS",
    "eval_tokenize",
    "meteor_available",
    "most_frequent_caption_baseline",
    "score_captions",
]

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS
PTB_PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--"]
    + ["...", ";"]
)
_DROP = PTB_PUNCTUATIONS | {'"', "(", ")", "[", "]", "{", "}"}
_CLITICS = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'m|'d)\b")
_TOKEN = re.compile(r"n't|'[a-z]+|\w+(?:[-'./]\w+)*|\.\.\.|--|\S")


def eval_tokenize(text: str) -> str:
    """PTB-like tokenisation for evaluation; returns space-joined lowercase tokens.

    "A man's hat, (red)." -> "a man 's hat red".
    """
    text = _CLITICS.sub(r" \1", text.lower().replace("\n", " "))
    return " ".join(t for t in _TOKEN.findall(text) if t not in _DROP)


def meteor_available() -> bool:
    """True if java is on PATH and pycocoevalcap's METEOR jar exists."""
    try:
        import pycocoevalcap.meteor.meteor as m
    except ImportError:  # pragma: no cover
        return False
    jar = Path(m.__file__).with_name(m.METEOR_JAR)
    return shutil.which("java") is not None and jar.is_file()


def _meteor(gts: dict, res: dict, timeout: float) -> float | None:
    """METEOR via pycocoevalcap's Java wrapper in a thread, or None on any problem."""
    try:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
    except Exception:
        return None
    result: dict[str, float] = {}

    def work() -> None:
        try:
            result["score"] = float(scorer.compute_score(gts, res)[0])
        except Exception:
            pass

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout)
    proc = scorer.meteor_p
    proc.kill()
    thread.join(5)
    proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass
    # Meteor.__del__ takes its lock; a failed compute_score leaves it held: give it a fresh one.
    scorer.lock = threading.Lock()
    return result.get("score")


def score_captions(
    references: Mapping[Hashable, Sequence[str]],
    hypotheses: Mapping[Hashable, str],
    *,
    meteor: bool | None = None,
    meteor_timeout: float = 120.0,
) -> dict[str, float]:
    """Corpus-level caption scores.

    Parameters
    ----------
    references : mapping id -> list of str
        Reference captions per image (raw text; tokenised here).
    hypotheses : mapping id -> str
        One generated caption per image; same ids as `references`.
    meteor : bool, optional
        None: METEOR if available; False: never; True: try (still skipped if unavailable).
    meteor_timeout : float
        Seconds before giving up on the Java METEOR process.

    Returns
    -------
    dict[str, float]
        Keys "BLEU-1".."BLEU-4", "ROUGE-L", "CIDEr-D" and, when run, "METEOR".
    """
    if not references:
        raise ConfigError("score_captions: no references")
    if set(references) != set(hypotheses):
        missing = set(references) ^ set(hypotheses)
        raise ConfigError(
            f"score_captions: references and hypotheses have different ids "
            f"({len(missing)} differ, e.g. {sorted(map(repr, missing))[:3]})"
        )
    ids = list(references)
    gts: dict[Hashable, list[str]] = {}
    for i in ids:
        refs = references[i]
        if isinstance(refs, str) or not refs:
            raise ConfigError(f"score_captions: references[{i!r}] must be a non-empty list")
        gts[i] = [eval_tokenize(r) for r in refs]
    res = {i: [eval_tokenize(hypotheses[i])] for i in ids}

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    scores = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
    scores["ROUGE-L"] = float(rouge)
    scores["CIDEr-D"] = float(cider)
    if meteor is not False and meteor_available():
        value = _meteor(gts, res, meteor_timeout)
        if value is not None:
            scores["METEOR"] = value
    return scores


def most_frequent_caption_baseline(
    train_captions: Iterable[str | Sequence[str]],
    eval_refs: Mapping[Hashable, Sequence[str]],
    **kwargs: Any,
) -> tuple[str, dict[str, float]]:
    """Scores of answering every image with the most frequent training caption.

    Parameters
    ----------
    train_captions : iterable of str or token lists
        All training captions (compared after `eval_tokenize`; ties -> alphabetically first).
    eval_refs : mapping id -> list of str
        References of the evaluated images.
    **kwargs
        Passed to `score_captions` (e.g. ``meteor=False``).

    Returns
    -------
    caption : str
        The tokenised caption used.
    scores : dict[str, float]
        As `score_captions`.
    """
    counts = Counter(
        eval_tokenize(c if isinstance(c, str) else " ".join(c)) for c in train_captions
    )
    counts.pop("", None)
    if not counts:
        raise ConfigError("most_frequent_caption_baseline: no training captions")
    caption = min(counts, key=lambda c: (-counts[c], c))
    hypotheses = dict.fromkeys(eval_refs, caption)
    return caption, score_captions(eval_refs, hypotheses, **kwargs)
