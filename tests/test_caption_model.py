"""The caption model: shapes, loss terms, step/teacher-forcing parity, encoder freezing and
weights files, checkpoints, the PyTorch stepper and the parameter-budget helper."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from bbservice import checkpoints
from bbservice.decoding import beam_search, greedy, sample_gate_passes
from bbservice.errors import ConfigError, DataError
from bbservice.gates import GateConfig
from bbservice.models.caption import (
    AttentionDecoder,
    CaptionConfig,
    CaptionModel,
    ResNetEncoder,
    SoftAttention,
    TorchCaptionStepper,
    caption_loss,
    count_decoder_parameters,
    hidden_size_for_budget,
    resolve_pretrained_weights,
)
from bbservice.vocab import END_ID, START_ID

V = 11


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(gate: str | GateConfig = "bbeta5", **kw) -> CaptionConfig:
    base = dict(
        vocab_size=V,
        encoder_stages=2,
        image_size=32,
        grid_size=2,
        embed_dim=8,
        attention_dim=8,
        hidden_size=16,
        dropout=0.0,
        gate=GateConfig.of(gate),
        max_length=6,
    )
    return CaptionConfig(**{**base, **kw})


def batch(n: int = 3, length: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    lengths = torch.tensor([length, length - 2, 3][:n])
    captions = torch.randint(4, V, (n, length), generator=g)
    captions[:, 0] = START_ID
    for i, n_tok in enumerate(lengths.tolist()):
        captions[i, n_tok - 1] = END_ID
        captions[i, n_tok:] = 0
    return images, captions, lengths


def test_config_round_trip_and_errors():
    cfg = tiny(GateConfig(family="bbeta5", kl_weight=0.01))
    again = CaptionConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.gate.family == "bbeta5"
    assert cfg.feature_dim == 128 and cfg.positions == 4
    with pytest.raises(ConfigError, match="unknown fields"):
        CaptionConfig.from_dict({**cfg.to_dict(), "hiden_size": 3})
    with pytest.raises(ConfigError, match="encoder"):
        tiny(encoder="vgg16")
    with pytest.raises(ConfigError, match="decoder needs vocab_size"):
        AttentionDecoder(tiny(vocab_size=0))


def test_shapes():
    torch.manual_seed(0)
    model = CaptionModel.build(tiny())
    images, captions, lengths = batch()
    features = model.encoder(images)
    assert features.shape == (3, 4, 128)  # (B, P = 2·2, C of layer2)
    context, alpha = SoftAttention(128, 16, 8)(features, torch.zeros(3, 16))
    assert context.shape == (3, 128) and alpha.shape == (3, 4)
    torch.testing.assert_close(alpha.sum(1), torch.ones(3))
    logits, alphas, kl = model(images, captions, lengths)
    assert logits.shape == (3, 6, V) and alphas.shape == (3, 6, 4) and kl.shape == (3,)
    assert torch.all(alphas[1, 4:] == 0) and torch.all(alphas[2, 2:] == 0)  # past the ends
    torch.testing.assert_close(alphas[0].sum(1), torch.ones(6))


@pytest.mark.parametrize("family,kl_weight", [("bbeta5", 0.01), ("lstm", 0.0)])
def test_loss_terms(family, kl_weight):
    torch.manual_seed(1)
    cfg = tiny(GateConfig(family=family, kl_weight=kl_weight), attention_reg=0.7)
    model = CaptionModel.build(cfg)
    images, captions, lengths = batch()
    outputs = model(images, captions, lengths, gate_mode="mean")
    logits, alphas, kl = outputs
    loss = model.loss(outputs, captions, lengths)
    tokens = int((lengths - 1).sum())
    assert loss.tokens == tokens
    ce = sum(
        torch.nn.functional.cross_entropy(logits[i, : n - 1], captions[i, 1:n], reduction="sum")
        for i, n in enumerate(lengths.tolist())
    )
    att = sum(((1 - alphas[i, : n - 1].sum(0)) ** 2).sum() for i, n in enumerate(lengths.tolist()))
    torch.testing.assert_close(loss.ce, ce / tokens)
    torch.testing.assert_close(loss.attention, att / tokens)
    expected = (ce + 0.7 * att + kl_weight * kl.sum()) / tokens
    torch.testing.assert_close(loss.total, expected)
    if kl_weight:
        assert torch.all(kl > 0)
        # The KL of each caption is the per-step prior KL summed over its real steps only.
        short = model(images[2:], captions[2:, :3], lengths[2:], gate_mode="mean")[2]
        torch.testing.assert_close(short, kl[2:])
    else:
        assert torch.all(kl == 0)
    loss.total.backward()
    assert model.decoder.f_beta.weight.grad is not None


@pytest.mark.parametrize("family", ["bbeta5", "lstm", "g2"])
def test_step_equals_teacher_forcing_with_mean_gates(family):
    torch.manual_seed(2)
    model = CaptionModel.build(tiny(family, dropout=0.3)).eval()
    images, captions, lengths = batch()
    with torch.no_grad():
        logits, alphas, _ = model(images, captions, lengths)
        features = model.encoder(images)
        projected, h, c = model.decoder.encode_features(features)
        for t in range(captions.shape[1] - 1):
            log_probs, h, c, alpha = model.decoder.step(
                captions[:, t], h, c, features, "mean", projected
            )
            torch.testing.assert_close(
                log_probs, torch.log_softmax(logits[:, t], 1), atol=2e-5, rtol=1e-4
            )
            live = t < lengths - 1
            torch.testing.assert_close(alpha[live], alphas[live, t], atol=2e-6, rtol=1e-5)
        # Without the precomputed projection, the same step.
        again = model.decoder.step(
            captions[:, 0], *model.decoder.encode_features(features)[1:], features
        )
        first = model.decoder.step(
            captions[:, 0],
            *model.decoder.encode_features(features)[1:],
            features,
            "mean",
            projected,
        )
        torch.testing.assert_close(again[0], first[0])


def test_sampled_gates_and_scheduled_sampling_run_and_differ():
    torch.manual_seed(3)
    model = CaptionModel.build(tiny()).train()
    images, captions, lengths = batch()
    g = torch.Generator().manual_seed(0)
    a = model(images, captions, lengths, generator=g)[0]
    g = torch.Generator().manual_seed(0)
    b = model(images, captions, lengths, generator=g)[0]
    torch.testing.assert_close(a, b)  # seeded sampled gates are reproducible
    c = model(images, captions, lengths, gate_mode="mean")[0]
    assert not torch.allclose(a, c)
    ss = model(images, captions, lengths, sample_prob=1.0, generator=g)
    loss = model.loss(ss, captions, lengths)
    loss.total.backward()
    assert torch.isfinite(loss.total)


def test_sampled_training_draws_gate_noise_in_the_fused_kernel(monkeypatch):
    """On the CPU the teacher-forced decoder's sampled gates take the fused kernels' in-kernel
    noise (one seed per caption batch), not eager Gamma draws; eager (fused off) still works."""
    torch.manual_seed(3)
    model = CaptionModel.build(tiny()).train()
    images, captions, lengths = batch()
    features = model.encoder(images)
    gate = model.decoder.cell.gate

    def no_eager_draws(*args, **kw):
        raise AssertionError("eager gate noise drawn on the fused path")

    with monkeypatch.context() as m:
        m.setattr(gate, "draw_noise", no_eager_draws)
        logits = model.decoder(
            features, captions, lengths, generator=torch.Generator().manual_seed(1)
        )[0]
    assert torch.isfinite(logits).all()
    model.decoder.cell.fused = False
    eager = model.decoder(features, captions, lengths, generator=torch.Generator().manual_seed(1))[
        0
    ]
    mean = model.decoder(features, captions, lengths, gate_mode="mean")[0]
    assert torch.isfinite(eager).all() and not torch.allclose(eager, mean)


def test_frozen_encoder_has_no_grads_and_keeps_batchnorm_statistics():
    torch.manual_seed(4)
    model = CaptionModel.build(tiny(fine_tune=False)).train()
    images, captions, lengths = batch()
    bn = model.encoder.body.bn1
    before = bn.running_mean.clone()
    model.loss(model(images, captions, lengths), captions, lengths).total.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters())
    torch.testing.assert_close(bn.running_mean, before)
    assert model.parameter_counts()["trainable"] == model.parameter_counts()["decoder"]

    tuned = CaptionModel.build(tiny(fine_tune=True)).train()
    tuned.loss(tuned(images, captions, lengths), captions, lengths).total.backward()
    assert tuned.encoder.body.conv1.weight.grad is not None
    assert not torch.allclose(tuned.encoder.body.bn1.running_mean, torch.zeros(64))


def test_local_weights_file_loads_and_bad_files_fail(tmp_path):
    torch.manual_seed(5)
    net = torchvision.models.resnet18(weights=None)
    state = net.state_dict()
    pth, st = tmp_path / "r18.pth", tmp_path / "r18.safetensors"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, pth)
    save_file({k: v.contiguous() for k, v in state.items() if not k.startswith("fc.")}, str(st))
    for path in (pth, st):
        enc = ResNetEncoder("resnet18", grid_size=2, stages=2, weights=path)
        torch.testing.assert_close(enc.body.conv1.weight, state["conv1.weight"])
        torch.testing.assert_close(
            enc.body.layer2[0].bn1.running_var, state["layer2.0.bn1.running_var"]
        )
    cfg = tiny(encoder_weights=str(st))
    model = CaptionModel.build(cfg)
    torch.testing.assert_close(model.encoder.body.conv1.weight, state["conv1.weight"])

    with pytest.raises(DataError, match="not found"):
        ResNetEncoder("resnet18", weights=tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a weights file at all")
    with pytest.raises(DataError, match="not a readable weights file"):
        ResNetEncoder("resnet18", weights=garbage)
    with pytest.raises(DataError, match=r"does not match a torchvision resnet50: .*missing"):
        ResNetEncoder("resnet50", weights=st)
    other = tmp_path / "r34.safetensors"
    r34 = {
        k: v.contiguous()
        for k, v in torchvision.models.resnet34(weights=None).state_dict().items()
        if k.startswith("layer1.")
    }
    save_file(
        {**{k: v.contiguous() for k, v in state.items()}, **r34, "extra.w": torch.ones(1)},
        str(other),
    )
    with pytest.raises(DataError, match="unexpected"):
        ResNetEncoder("resnet18", weights=other)


def test_a_caption_checkpoint_lends_its_trained_encoder(tmp_path):
    torch.manual_seed(7)
    donor = CaptionModel.build(tiny(fine_tune=True))
    with torch.no_grad():
        for p in donor.encoder.parameters():
            p.add_(torch.randn_like(p))  # "trained": far from any fresh initialisation
    folder = tmp_path / "donor" / "best"
    folder.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in donor.state_dict().items()},
        str(folder / "model.safetensors"),
    )
    expected = donor.encoder.state_dict()
    for weights in (tmp_path / "donor", folder, folder / "model.safetensors"):
        model = CaptionModel.build(tiny("lstm", encoder_weights=str(weights)))  # frozen
        got = model.encoder.state_dict()
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], msg=key)
        assert not any(p.requires_grad for p in model.encoder.parameters())
    # more stages than the donor kept, or another architecture: a one-line DataError
    with pytest.raises(DataError, match=r"missing \(e\.g\. layer3"):
        CaptionModel.build(tiny(encoder_weights=str(folder), encoder_stages=3))
    with pytest.raises(DataError, match="does not match a torchvision resnet34"):
        CaptionModel.build(tiny(encoder="resnet34", encoder_weights=str(folder)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="not found"):
        CaptionModel.build(tiny(encoder_weights=str(empty)))


def test_pretrained_weight_names_resolve_to_torchvision_enums():
    from torchvision.models import ResNet18_Weights, ResNet50_Weights

    assert resolve_pretrained_weights("resnet50", "imagenet") is ResNet50_Weights.IMAGENET1K_V2
    assert resolve_pretrained_weights("resnet50", "ImageNet") is ResNet50_Weights.DEFAULT
    assert resolve_pretrained_weights("resnet18", "imagenet") is ResNet18_Weights.IMAGENET1K_V1
    assert resolve_pretrained_weights("resnet50", "IMAGENET1K_V1") is ResNet50_Weights.IMAGENET1K_V1
    qualified = resolve_pretrained_weights("resnet50", "ResNet50_Weights.IMAGENET1K_V2")
    assert qualified is ResNet50_Weights.IMAGENET1K_V2
    for other in ("weights/r50.pth", "IMAGENET1K_V9", "ResNet18_Weights.IMAGENET1K_V1"):
        assert resolve_pretrained_weights("resnet50", other) is None


@pytest.fixture
def fake_hub(monkeypatch):
    """torchvision's downloader replaced: nothing leaves this machine in tests."""
    import torchvision.models._api as api

    calls = []

    def serve(state):
        def load_state_dict_from_url(url, *args, **kwargs):
            calls.append(url)
            if state is None:
                raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
            return state

        monkeypatch.setattr(api, "load_state_dict_from_url", load_state_dict_from_url)
        return calls

    return serve


def test_imagenet_weights_come_through_torchvision_download(fake_hub):
    from torchvision.models import ResNet18_Weights

    torch.manual_seed(8)
    state = torchvision.models.resnet18(weights=None).state_dict()
    calls = fake_hub(state)
    model = CaptionModel.build(tiny(encoder_weights="imagenet"))
    assert calls == [ResNet18_Weights.IMAGENET1K_V1.url]
    torch.testing.assert_close(model.encoder.body.conv1.weight, state["conv1.weight"])
    torch.testing.assert_close(
        model.encoder.body.layer1[0].bn2.running_mean, state["layer1.0.bn2.running_mean"]
    )


def test_offline_imagenet_weights_give_one_line_telling_how_to_pass_a_file(fake_hub, tmp_path):
    fake_hub(None)
    with pytest.raises(DataError) as err:
        ResNetEncoder("resnet18", weights="imagenet")
    message = str(err.value)
    assert "\n" not in message
    assert "cannot fetch torchvision's resnet18 IMAGENET1K_V1 weights" in message
    assert "Temporary failure in name resolution" in message
    assert "resnet18-f37072fd.pth" in message and "--encoder-weights" in message
    # A local file of that name is a file, not a download.
    net = torchvision.models.resnet18(weights=None)
    local = tmp_path / "imagenet"
    torch.save(net.state_dict(), local)
    enc = ResNetEncoder("resnet18", grid_size=2, stages=1, weights=local)
    torch.testing.assert_close(enc.body.conv1.weight, net.conv1.weight)
    with pytest.raises(DataError, match="not found .*named: imagenet, IMAGENET1K_V1, DEFAULT"):
        ResNetEncoder("resnet18", weights=tmp_path / "missing.pth")


def test_checkpoint_round_trip_and_stepper(tmp_path):
    torch.manual_seed(6)
    model = CaptionModel.build(tiny()).eval()
    folder = tmp_path / "run" / "best"
    folder.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "model.safetensors"),
    )
    (folder / "config.json").write_text(
        json.dumps({"kind": "caption", "model": model.config.to_dict()})
    )
    loaded = checkpoints.load_caption_model(tmp_path / "run")[0]
    images = batch()[0].numpy()
    a = greedy(TorchCaptionStepper(model), images, start_id=START_ID, end_id=END_ID, max_length=6)
    b = greedy(TorchCaptionStepper(loaded), images, start_id=START_ID, end_id=END_ID, max_length=6)
    assert [h.tokens for h in a] == [h.tokens for h in b]
    assert a[0].attention.shape == (len(a[0].tokens), 4)
    beams = beam_search(
        TorchCaptionStepper(model), images, start_id=START_ID, end_id=END_ID, beam_size=3, n_best=2
    )
    assert all(len(per) == 2 and per[0].score >= per[1].score for per in beams)

    # Sampled gates: seeded, reproducible, and different from the mean-gate decode.
    def passes(seed):
        stepper = TorchCaptionStepper(model, "sample", seed=seed)
        return sample_gate_passes(stepper, images, passes=6, start_id=START_ID, end_id=END_ID)

    r1, r2 = passes(0), passes(0)
    assert [r.captions for r in r1] == [r.captions for r in r2]
    assert all(0.0 <= r.disagreement < 1.0 for r in r1)

    (tmp_path / "bad").mkdir()
    with pytest.raises(DataError, match="not a checkpoint folder"):
        checkpoints.load_caption_model(tmp_path / "bad")[0]
    (folder / "config.json").write_text('{"kind": "music", "model": {}}')
    with pytest.raises(DataError, match="not caption"):
        checkpoints.load_caption_model(folder)[0]
    (folder / "config.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        checkpoints.load_caption_model(folder)[0]


def test_caption_loss_ignores_padding_logits():
    torch.manual_seed(7)
    logits = torch.randn(2, 4, V)
    alphas = torch.zeros(2, 4, 3)
    captions = torch.tensor([[1, 5, 6, 2, 0], [1, 7, 2, 0, 0]])
    lengths = torch.tensor([4, 3])
    a = caption_loss(logits, alphas, torch.zeros(2), captions, lengths, 0.0, 0.0)
    logits[1, 2:] = 100.0  # past the end of the second caption
    b = caption_loss(logits, alphas, torch.zeros(2), captions, lengths, 0.0, 0.0)
    torch.testing.assert_close(a.total, b.total)
    assert a.tokens == 5


def test_hidden_size_for_budget_matches_within_one_percent():
    lstm = tiny("lstm", hidden_size=64, vocab_size=50)
    target = count_decoder_parameters(lstm)
    for family in ("bbeta5", "beta", "cifg"):
        cfg = replace(lstm, gate=GateConfig(family=family))
        h = hidden_size_for_budget(cfg, target)
        got = count_decoder_parameters(replace(cfg, hidden_size=h))
        assert abs(got - target) / target < 0.01, (family, h, got, target)
    assert hidden_size_for_budget(replace(lstm, gate=GateConfig(family="bbeta5")), target) < 64


def test_stepper_state_is_numpy_and_static_keys_do_not_change():
    torch.manual_seed(8)
    model = CaptionModel.build(tiny()).eval()
    stepper = TorchCaptionStepper(model)
    state = stepper.start(batch()[0].numpy())
    assert set(state) == {"h", "c", "features", "projected"}
    assert all(isinstance(v, np.ndarray) and v.shape[0] == 3 for v in state.values())
    log_probs, new, att = stepper.step(np.full(3, START_ID), state)
    assert log_probs.shape == (3, V) and log_probs.dtype == np.float32 and att.shape == (3, 4)
    np.testing.assert_allclose(np.exp(log_probs).sum(1), 1.0, rtol=1e-5)
    assert new["features"] is state["features"] and not np.allclose(new["h"], state["h"])


def test_step_exports_to_onnx_and_drives_the_same_decoder(tmp_path):
    """The mean-gate step traces to ONNX with a dynamic batch; an ONNX Runtime stepper decodes
    the same captions as the PyTorch one (the decoding code is shared)."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(9)
    model = CaptionModel.build(tiny("bbeta5")).eval()

    class Step(torch.nn.Module):
        def __init__(self, decoder):
            super().__init__()
            self.decoder = decoder

        def forward(self, tokens, h, c, features, projected):
            return self.decoder.step(tokens, h, c, features, "mean", projected)

    torch_stepper = TorchCaptionStepper(model)
    images = batch()[0].numpy()
    state = torch_stepper.start(images)
    names = ["tokens", "h", "c", "features", "projected"]
    outputs = ["log_probs", "h_out", "c_out", "alpha"]
    example = tuple(torch.from_numpy(state[k]) for k in names[1:])
    path = tmp_path / "step.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Step(model.decoder),
            (torch.full((3,), START_ID), *example),
            str(path),
            input_names=names,
            output_names=outputs,
            dynamic_axes={k: {0: "N"} for k in names + outputs},
            dynamo=False,
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    class OrtStepper:
        static_keys = TorchCaptionStepper.static_keys

        def start(self, inputs):
            return torch_stepper.start(inputs)

        def step(self, tokens, state):
            feed = {"tokens": tokens.astype(np.int64), **{k: state[k] for k in names[1:]}}
            log_probs, h, c, alpha = session.run(outputs, feed)
            return log_probs, dict(state, h=h, c=c), alpha

    kw = {"start_id": START_ID, "end_id": END_ID, "beam_size": 3, "n_best": 3, "max_length": 6}
    want = beam_search(TorchCaptionStepper(model), images, **kw)
    got = beam_search(OrtStepper(), images, **kw)
    for w, g in zip(want, got, strict=True):
        assert [h.tokens for h in w] == [h.tokens for h in g]
        np.testing.assert_allclose([h.log_prob for h in w], [h.log_prob for h in g], atol=1e-4)
