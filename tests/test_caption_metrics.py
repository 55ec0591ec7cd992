"""Tests of training.caption_metrics: pinned scores, sanity values, tokenizer, baseline."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from bbservice.errors import ConfigError
from training.caption_metrics import (
    eval_tokenize,
    meteor_available,
    most_frequent_caption_baseline,
    score_captions,
)

REFS = {
    "img1": [
        "A man riding a horse on a beach.",
        "A person rides a brown horse along the shore.",
        "Man on horseback at the beach!",
    ],
    "img2": [
        "Two dogs playing in the snow.",
        "A pair of dogs run through snow.",
        "Dogs play together in the snow, outside.",
    ],
    "img3": [
        "A plate of food with broccoli and rice.",
        "Rice, broccoli and chicken on a white plate.",
        "A white plate topped with food.",
    ],
    "img4": [
        "A red bus driving down a city street.",
        "The double-decker bus is red.",
        "A bus on the street in a city.",
    ],
}
HYPS = {
    "img1": "A man riding a horse on the beach.",
    "img2": "Two dogs are playing in the snow.",
    "img3": "A plate of rice and broccoli.",
    "img4": "A man riding a horse.",
}
TRAIN = ["A man riding a horse.", "a man riding a horse", "A dog in the snow.", "A red bus."]

# Computed once with pycocoevalcap 1.2's scorers and this module's tokenizer.
PINNED = {
    "BLEU-1": 0.8462,
    "BLEU-2": 0.6794,
    "BLEU-3": 0.5641,
    "BLEU-4": 0.4759,
    "ROUGE-L": 0.6659,
    "CIDEr-D": 2.0425,
}
PINNED_BASELINE = {
    "BLEU-1": 0.3873,
    "BLEU-2": 0.2887,
    "BLEU-3": 0.2617,
    "BLEU-4": 0.2492,
    "ROUGE-L": 0.3436,
    "CIDEr-D": 0.6496,
}


def test_pinned_scores() -> None:
    scores = score_captions(REFS, HYPS, meteor=False)
    assert set(scores) == set(PINNED)
    for key, value in PINNED.items():
        assert scores[key] == pytest.approx(value, abs=5e-5), key


def test_identical_hypothesis_gives_perfect_bleu_and_rouge() -> None:
    hyps = {k: v[0] for k, v in REFS.items()}
    scores = score_captions(REFS, hyps, meteor=False)
    for n in range(1, 5):
        assert scores[f"BLEU-{n}"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE-L"] == pytest.approx(1.0)
    assert scores["CIDEr-D"] > PINNED["CIDEr-D"]


def test_disjoint_words_give_about_zero() -> None:
    scores = score_captions(REFS, dict.fromkeys(REFS, "zebra giraffe elephant"), meteor=False)
    assert all(v == pytest.approx(0.0, abs=1e-9) for v in scores.values()), scores


def test_hand_computed_single_image() -> None:
    # 5 of 6 unigrams match, same length (no brevity penalty); LCS 5 of 6 both ways.
    scores = score_captions(
        {0: ["the cat sat on the mat"]}, {0: "The cat sat on a mat."}, meteor=False
    )
    assert scores["BLEU-1"] == pytest.approx(5 / 6, abs=1e-6)
    assert scores["ROUGE-L"] == pytest.approx(5 / 6, abs=1e-6)
    assert scores["CIDEr-D"] == 0.0  # IDF from one image's references is zero


def test_tokenizer_drops_ptb_punctuation() -> None:
    assert eval_tokenize("A man's hat, (red).") == "a man 's hat red"
    assert eval_tokenize('Don\'t "go" -- now... okay?!') == "do n't go now okay"
    assert eval_tokenize("A T-shirt; 3.5 dogs & cats:") == "a t-shirt 3.5 dogs & cats"
    assert eval_tokenize("The dogs' bowls\nDONE") == "the dogs bowls done"


def test_most_frequent_caption_baseline() -> None:
    caption, scores = most_frequent_caption_baseline(TRAIN, REFS, meteor=False)
    assert caption == "a man riding a horse"
    for key, value in PINNED_BASELINE.items():
        assert scores[key] == pytest.approx(value, abs=5e-5), key
    tokens = [c.lower().rstrip(".").split() for c in TRAIN]
    assert most_frequent_caption_baseline(tokens, REFS, meteor=False)[0] == caption


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError, match="different ids"):
        score_captions(REFS, {"img1": "a man"})
    with pytest.raises(ConfigError, match="no references"):
        score_captions({}, {})
    with pytest.raises(ConfigError, match="non-empty list"):
        score_captions({1: "a string, not a list"}, {1: "a"})
    with pytest.raises(ConfigError, match="no training captions"):
        most_frequent_caption_baseline([], REFS)


def test_meteor_when_java_is_available() -> None:
    if not meteor_available():
        pytest.skip("java or pycocoevalcap's METEOR jar not available")
    hyps = dict(HYPS, img4=REFS["img4"][0])
    scores = score_captions(REFS, hyps)
    assert "METEOR" in scores, "METEOR silently failed although java and the jar are present"
    assert 0.3 < scores["METEOR"] < 1.0


class _HangingMeteor:
    """Stands in for pycocoevalcap's Meteor: its Java process never answers."""

    def __init__(self) -> None:
        self.meteor_p = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lock = threading.Lock()

    def compute_score(self, gts: dict, res: dict) -> tuple[float, list[float]]:
        self.lock.acquire()
        return float(self.meteor_p.stdout.readline()), []  # b"" once killed -> ValueError


class _BrokenMeteor:
    def __init__(self) -> None:
        raise OSError("java: not found")


@pytest.mark.parametrize("fake", [_HangingMeteor, _BrokenMeteor])
def test_meteor_failure_is_skipped_not_raised(monkeypatch: pytest.MonkeyPatch, fake: type) -> None:
    import pycocoevalcap.meteor.meteor as meteor_module

    import training.caption_metrics as cm

    monkeypatch.setattr(meteor_module, "Meteor", fake)
    monkeypatch.setattr(cm, "meteor_available", lambda: True)
    start = time.monotonic()
    scores = score_captions(REFS, HYPS, meteor=True, meteor_timeout=0.5)
    assert "METEOR" not in scores
    assert scores["BLEU-4"] == pytest.approx(PINNED["BLEU-4"], abs=5e-5)
    assert time.monotonic() - start < 10
