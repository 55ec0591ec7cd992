"""Self-critical training: the CIDEr-D reward against pycocoevalcap, the baselines, the sign of
the policy gradient on a tiny model, and gate sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocoevalcap.cider.cider import Cider

from bbservice.decoding import greedy
from bbservice.errors import ConfigError
from bbservice.models.caption import CaptionConfig, CaptionModel, TorchCaptionStepper
from bbservice.vocab import END_ID, START_ID
from training.caption_metrics import eval_tokenize, score_captions
from training.cider_reward import CiderD
from training.scst import (
    SCSTBatch,
    SCSTConfig,
    captions_text,
    greedy_captions,
    mean_of_others,
    sample_captions,
    scst_loss,
    scst_step,
)

WORDS = ["red", "blue", "green", "circle", "square", "star", "a", "and"]
ITOS = ["<pad>", "<start>", "<end>", "<unk>", *WORDS]
REFS = [
    ["a red circle", "a red circle and a blue square", "red circle"],
    ["a blue square", "blue square", "a blue square and a star"],
    ["a green star", "green star and a red circle", "a star"],
    ["a red square", "red square", "a square"],
]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(gate: str = "lstm", seed: int = 0) -> CaptionModel:
    torch.manual_seed(seed)
    config = CaptionConfig(
        vocab_size=len(ITOS),
        encoder="resnet18",
        encoder_stages=1,
        image_size=32,
        grid_size=2,
        embed_dim=8,
        attention_dim=8,
        hidden_size=12,
        dropout=0.0,
        gate=gate,
        max_length=6,
    )
    return CaptionModel.build(config)


def features(b: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 4, 64, generator=torch.Generator().manual_seed(seed))


# -- reward --------------------------------------------------------------------------------------


def test_cider_reward_equals_pycocoevalcap_on_its_own_references():
    hyps = ["a red circle", "a blue star", "green star", "square red a"]
    scorer = CiderD(REFS)  # IDF from the scored set's references, as pycocoevalcap does
    ours = scorer.score(hyps, REFS)
    gts = {i: [eval_tokenize(r) for r in refs] for i, refs in enumerate(REFS)}
    res = {i: [eval_tokenize(h)] for i, h in enumerate(hyps)}
    mean, per_image = Cider().compute_score(gts, res)
    np.testing.assert_allclose(ours, per_image, rtol=1e-12, atol=1e-12)
    assert ours.mean() == pytest.approx(
        score_captions(dict(enumerate(REFS)), dict(enumerate(hyps)), meteor=False)["CIDEr-D"]
    )
    assert ours[0] > ours[3] > 0.0


def test_cider_reward_keeps_the_training_idf():
    train = REFS + [["a red circle"]] * 6  # "red circle" becomes common, so it is worth less
    fixed = CiderD(train)
    assert fixed.images == 10 and fixed.ref_len == pytest.approx(np.log(10))
    # Scoring one image does not change the IDF (pycocoevalcap's would be log(1) − log(1) = 0).
    alone = fixed.score(["a blue square"], [REFS[1]])
    assert alone[0] > 0.0
    assert fixed.score(["a blue square"], [REFS[1]])[0] == alone[0]
    with pytest.raises(ConfigError, match="2 hypotheses but 1"):
        fixed.score(["a", "b"], [REFS[0]])
    with pytest.raises(ConfigError, match="non-empty"):
        CiderD([[]])


# -- baselines and loss --------------------------------------------------------------------------


def test_mean_of_others_is_the_leave_one_out_mean():
    r = np.array([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    np.testing.assert_allclose(mean_of_others(r), [[4.0, 3.5, 1.5], [1.5, 1.5, 0.0]])
    with pytest.raises(ConfigError, match="K >= 2"):
        mean_of_others(np.ones((3, 1)))


def test_scst_loss_is_the_advantage_weighted_token_mean():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    loss = scst_loss(lp, mask, adv)
    assert float(loss.detach()) == pytest.approx(-(2 * -6.0 + -1 * -1.0) / 5)
    loss.backward()
    np.testing.assert_allclose(lp.grad, [[-0.4, -0.4, -0.4], [0.2, 0.2, 0.0]])


def test_greedy_baseline_is_the_reward_of_the_greedy_caption():
    model = tiny_model().train()
    feats = features()
    ref_greedy = greedy(
        TorchCaptionStepper(model, device="cpu"),
        feats.numpy(),
        start_id=START_ID,
        end_id=END_ID,
        max_length=model.config.max_length,
    )
    model.train()  # the stepper put it in eval mode
    ours = greedy_captions(model, feats)
    assert model.training
    # Words as the vocabulary decodes them: <pad>/<start> (an untrained model emits them) drop.
    words = [" ".join(ITOS[t] for t in h.tokens if t > END_ID) for h in ref_greedy]
    assert captions_text(ours, ITOS) == words
    scorer = CiderD(REFS)
    result = scst_step(
        model,
        SCSTBatch(feats, REFS),
        scorer,
        ITOS,
        SCSTConfig(baseline="greedy", samples=3),
        generator=torch.Generator().manual_seed(0),
    )
    expected = scorer.score(captions_text(ours, ITOS), REFS).mean()
    assert result.stats["greedy_reward"] == pytest.approx(expected)
    assert result.stats["baseline"] == pytest.approx(expected)
    assert result.stats["samples"] == 12


def test_mean_baseline_uses_the_other_samples_and_rewards_match_the_metric():
    model = tiny_model().train()
    feats = features()
    scorer = CiderD(REFS)
    config = SCSTConfig(baseline="mean", samples=4)
    result = scst_step(
        model,
        SCSTBatch(feats, REFS),
        scorer,
        ITOS,
        config,
        generator=torch.Generator().manual_seed(3),
    )
    again = sample_captions(model, feats, 4, generator=torch.Generator().manual_seed(3))
    rewards = scorer.score(captions_text(again.tokens, ITOS), [r for r in REFS for _ in range(4)])
    assert result.stats["reward"] == pytest.approx(rewards.mean())
    # The mean of leave-one-out means is the mean reward.
    assert result.stats["baseline"] == pytest.approx(rewards.mean())
    adv = rewards.reshape(4, 4) - mean_of_others(rewards.reshape(4, 4))
    assert result.stats["advantage_std"] == pytest.approx(adv.std())
    expected = scst_loss(again.log_probs, again.mask, torch.tensor(adv.reshape(-1)))
    assert float(result.loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_samples_are_consistent_with_their_log_probs():
    model = tiny_model().eval()
    feats = features(2)
    s = sample_captions(model, feats, 5, generator=torch.Generator().manual_seed(0))
    assert s.tokens.shape[0] == 10 and s.tokens.shape == s.log_probs.shape == s.mask.shape
    assert s.tokens.shape[1] <= model.config.max_length
    # Teacher-forced log-probability of each sampled caption = the summed sampled log-probs.
    for n in range(10):
        length = int(s.mask[n].sum())
        caption = torch.cat([torch.tensor([START_ID]), s.tokens[n, :length]]).unsqueeze(0)
        logits, _, _ = model.decoder(
            feats[n // 5 : n // 5 + 1], caption, torch.tensor([length + 1]), gate_mode="mean"
        )
        lp = torch.log_softmax(logits, dim=2)[0].gather(1, s.tokens[n, :length, None]).sum()
        assert float(lp.detach()) == pytest.approx(float(s.log_probs[n].detach().sum()), abs=1e-4)
        ended = (s.tokens[n] == END_ID).nonzero()
        if len(ended):
            assert int(ended[0]) == length - 1 and (s.tokens[n, length:] == 0).all()


# -- the gradient ------------------------------------------------------------------------------


def sequence_log_prob(model, feats, tokens, mask) -> torch.Tensor:
    """Teacher-forced log-probability of sampled rows (N, T) of one image."""
    out = []
    for row, m in zip(tokens, mask, strict=True):
        length = int(m.sum())
        caption = torch.cat([torch.tensor([START_ID]), row[:length]]).unsqueeze(0)
        logits, _, _ = model.decoder(feats, caption, torch.tensor([length + 1]), gate_mode="mean")
        out.append(torch.log_softmax(logits, dim=2)[0].gather(1, row[:length, None]).sum())
    return torch.stack(out)


def test_one_step_raises_the_log_prob_of_the_better_sample():
    model = tiny_model().train()
    feats = features(1, seed=4)
    refs = [REFS[0]]
    scorer = CiderD(REFS)
    config = SCSTConfig(baseline="mean", samples=2)
    for seed in range(50):  # the first seed whose two samples earn different rewards
        s = sample_captions(model, feats, 2, generator=torch.Generator().manual_seed(seed))
        rewards = scorer.score(captions_text(s.tokens, ITOS), refs * 2)
        if rewards[0] != rewards[1]:
            break
    else:
        pytest.fail("no two samples with different rewards")
    better, worse = int(np.argmax(rewards)), int(np.argmin(rewards))
    before = sequence_log_prob(model, feats, s.tokens, s.mask).detach()
    optimizer = torch.optim.SGD(model.decoder.parameters(), lr=0.05)
    result = scst_step(
        model,
        SCSTBatch(feats, refs),
        scorer,
        ITOS,
        config,
        generator=torch.Generator().manual_seed(seed),
    )
    assert result.stats["reward"] == pytest.approx(rewards.mean())
    optimizer.zero_grad()
    result.loss.backward()
    optimizer.step()
    after = sequence_log_prob(model, feats, s.tokens, s.mask).detach()
    assert after[better] > before[better]
    assert after[worse] < before[worse]


# -- gates and arguments -----------------------------------------------------------------------


def test_sampled_gates_change_the_samples_and_need_a_stochastic_family():
    model = tiny_model("bbeta5").train()
    feats = features(2)

    def draw(seed: int, sample_gates: bool):
        g = torch.Generator().manual_seed(seed)
        return sample_captions(model, feats, 3, sample_gates=sample_gates, generator=g)

    def same(a, b) -> bool:
        if a.tokens.shape != b.tokens.shape or not torch.equal(a.tokens, b.tokens):
            return False
        return torch.allclose(a.log_probs, b.log_probs)

    assert same(draw(0, False), draw(0, False))  # seeded: the same draws again
    assert same(draw(0, True), draw(0, True))
    assert not same(draw(0, False), draw(0, True))  # the gates' noise changes the samples
    result = scst_step(
        model,
        SCSTBatch(feats, REFS[:2]),
        CiderD(REFS),
        ITOS,
        SCSTConfig(samples=2, sample_gates=True),
    )
    result.loss.backward()
    assert model.decoder.cell.weight_hh.grad is not None
    with pytest.raises(ConfigError, match="'lstm' has deterministic gates"):
        sample_captions(tiny_model("lstm"), feats, 2, sample_gates=True)


def test_config_and_batch_errors():
    with pytest.raises(ConfigError, match="unknown SCST baseline"):
        SCSTConfig(baseline="max")
    with pytest.raises(ConfigError, match="at least 2 samples"):
        SCSTConfig(baseline="mean", samples=1)
    with pytest.raises(ConfigError, match="samples must be >= 1"):
        SCSTConfig(samples=0)
    with pytest.raises(ConfigError, match="4 inputs but 3 reference lists"):
        SCSTBatch(features(4), REFS[:3])
    with pytest.raises(ConfigError, match="images .B, 3, S, S. or features"):
        SCSTBatch(torch.zeros(4, 5), REFS)


def test_images_go_through_the_encoder():
    model = tiny_model().train()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = scst_step(
        model, SCSTBatch(images, REFS[:2]), CiderD(REFS), ITOS, SCSTConfig(samples=2)
    )
    assert torch.isfinite(result.loss) and result.stats["samples"] == 4
