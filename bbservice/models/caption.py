"""Image captioning: a ResNet grid encoder and a soft-attention decoder with gated-LSTM recurrence.

Show, Attend and Tell (Xu et al., 2015), with the LSTM's input and forget gates drawn from any
gate family of ``shared/docs/GATES.md`` (default ``bbeta5``)::

    images (B, 3, S, S) ──ResNetEncoder──▶ features (B, P = G·G, C)
    features ──encode_features──▶ projected (B, P, A), h0 (B, H), c0 (B, H)
    every step t:   context, α_t = SoftAttention(features, h)            (B, C), (B, P)
                    β = σ(f_β(h))                                       (B, 1) gating scalar
                    h, c = GatedLSTMCell([embed(w_{t-1}), β·context], (h, c))
                    log p(w_t) = log_softmax(Linear(dropout(h)))        (B, V)

The loss per caption is SAT's: the summed token cross-entropy, plus λ·Σ_p (1 − Σ_t α_tp)²
(the doubly-stochastic attention regulariser), plus kl_weight·(gate prior KL summed over
steps and units); the batch loss divides the sum over captions by the number of real tokens,
so the CE term is the usual per-token mean and the KL is normalised per token as GATES.md says.

:meth:`AttentionDecoder.step` is one decoding step with the whole state as explicit inputs and
outputs and no data-dependent Python control flow: with mean gates it is the graph exported
to ONNX. :class:`TorchCaptionStepper` drives it from the NumPy decoders of
:mod:`bbservice.decoding`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bbservice.cells import GatedLSTMCell
from bbservice.errors import ConfigError, DataError, first_line
from bbservice.gates import GateConfig, resolve_gate_mode

ENCODER_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# Output channels of layer1..layer4.
_STAGE_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
    "resnet152": (256, 512, 1024, 2048),
}


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class CaptionConfig:
    """Everything that defines a caption model (saved as ``config.json["model"]``).

    Parameters
    ----------
    vocab_size : words including the four specials (``<pad>``, ``<start>``, ``<end>``, ``<unk>``).
    encoder : torchvision ResNet, one of :data:`ENCODER_ARCHS`; built with ``weights=None``.
    encoder_weights : optional weights of that ResNet, loaded when the model is first built:
        a local file (``.safetensors`` or a ``torch.save`` state dict), a caption checkpoint
        or run folder (its trained encoder, e.g. to train a new decoder on a fine-tuned
        encoder kept frozen), or torchvision's pretrained weights by name (``"imagenet"``, a
        member such as ``"IMAGENET1K_V1"`` or ``"ResNet50_Weights.IMAGENET1K_V2"``; see
        :func:`resolve_pretrained_weights`), fetched through torchvision's own download and
        cache.
    encoder_stages : ResNet stages kept (1-4). 4 is the usual stride-32 grid; 3 (stride 16)
        gives a finer grid on small images, e.g. 4×4 at 64 px.
    fine_tune : train the encoder (else it is frozen, batch-norm statistics included).
    image_size : side S of the square input images.
    grid_size : G: the feature map is adaptive-average-pooled to G×G, P = G² positions.
    embed_dim, attention_dim, hidden_size : E, A, H.
    dropout : on h before the output layer.
    gate : gate family and its hyper-parameters (``kl_weight`` is the prior's λ).
    max_length : longest caption in words (training truncates, decoding stops there).
    attention_reg : λ of the doubly-stochastic attention regulariser.
    sparse : sparse variational dropout on the decoder cell's weights, inputs, hidden units and
        gate pre-activations (:class:`bbservice.sparse.SparseGatedLSTMCell`); prune and export
        with :mod:`bbservice.pruning`.
    """

    vocab_size: int = 0
    encoder: str = "resnet18"
    encoder_weights: str | None = None
    encoder_stages: int = 4
    fine_tune: bool = False
    image_size: int = 224
    grid_size: int = 7
    embed_dim: int = 256
    attention_dim: int = 256
    hidden_size: int = 512
    dropout: float = 0.5
    gate: GateConfig = field(default_factory=lambda: GateConfig(family="bbeta5"))
    max_length: int = 20
    attention_reg: float = 1.0
    sparse: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.gate, str):
            self.gate = GateConfig(family=self.gate)
        elif isinstance(self.gate, dict):
            self.gate = GateConfig(**self.gate)
        if self.encoder not in ENCODER_ARCHS:
            raise ConfigError(
                f"unknown encoder {self.encoder!r}; choose one of {', '.join(ENCODER_ARCHS)}"
            )
        if self.vocab_size != 0 and self.vocab_size < 5:  # 0: not known yet (set from the data)
            raise ConfigError(
                f"vocab_size must be >= 5 (4 specials + words), got {self.vocab_size}"
            )
        if not 1 <= self.encoder_stages <= 4:
            raise ConfigError(f"encoder_stages must be in 1..4, got {self.encoder_stages}")
        for name in ("image_size", "grid_size", "embed_dim", "attention_dim", "hidden_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size < 16:
            raise ConfigError(f"image_size must be >= 16, got {self.image_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.max_length < 1:
            raise ConfigError(f"max_length must be >= 1, got {self.max_length}")
        if self.attention_reg < 0:
            raise ConfigError(f"attention_reg must be >= 0, got {self.attention_reg}")
        if self.sparse and self.gate.family == "mlstm":
            raise ConfigError("sparse variational dropout does not support the 'mlstm' family")

    @property
    def feature_dim(self) -> int:
        """C: channels of the encoder's last kept stage."""
        return _STAGE_CHANNELS[self.encoder][self.encoder_stages - 1]

    @property
    def positions(self) -> int:
        """P = G²."""
        return self.grid_size * self.grid_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CaptionConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"caption config: unknown fields {unknown}")
        return cls(**data)


# --------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------


PRETRAINED_ALIASES = {"imagenet": "DEFAULT"}  # names of torchvision weight enum members


def resolve_pretrained_weights(arch: str, name: str):
    """torchvision's weights enum member that ``name`` names for ``arch``, or ``None``.

    ``"imagenet"`` (any case) is the architecture's ``DEFAULT`` (the best ImageNet-1k
    weights: ``IMAGENET1K_V1`` for resnet18/34, ``IMAGENET1K_V2`` for resnet50/101/152);
    a member name (``"IMAGENET1K_V1"``) or the qualified name
    (``"ResNet50_Weights.IMAGENET1K_V2"``) names that member. Anything else (e.g. a file
    path) gives ``None``. Nothing is downloaded here.
    """
    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    key = PRETRAINED_ALIASES.get(name.lower(), name)
    key = key.removeprefix(f"{enum.__name__}.")
    try:
        return enum[key]
    except KeyError:
        return None


def pretrained_weight_names(arch: str) -> list[str]:
    """The names :func:`resolve_pretrained_weights` accepts for ``arch`` (aliases first)."""
    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    return [*PRETRAINED_ALIASES, *enum.__members__]


def load_pretrained_weights(net: nn.Module, weights, arch: str, progress: bool = True) -> None:
    """Load torchvision's ``weights`` (an enum member) into a ResNet, or raise a one-line error.

    The file comes through torchvision's own download and cache
    (``weights.get_state_dict``: ``$TORCH_HOME/hub/checkpoints``, downloaded once); when it
    cannot be fetched (offline), the :class:`DataError` says how to pass a local file instead.
    """
    try:
        state = weights.get_state_dict(progress=progress)
    except Exception as err:  # urllib, ssl, socket and hash-check errors
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        filename = weights.url.rsplit("/", 1)[-1]
        raise DataError(
            f"cannot fetch torchvision's {arch} {weights.name} weights ({detail}); without a "
            f"network, download {weights.url} elsewhere and pass its path as --encoder-weights "
            f"(or put {filename} in {torch.hub.get_dir()}/checkpoints)"
        ) from err
    _load_resnet_state(net, state, f"{arch} {weights.name}", arch)


def checkpoint_weights_file(path: str | Path) -> Path:
    """A caption run or checkpoint folder → its ``model.safetensors`` (a run's ``best/``
    first); any other path unchanged."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "best" / "model.safetensors", path / "model.safetensors"):
            if candidate.is_file():
                return candidate
    return path


def load_resnet_weights(net: nn.Module, path: str | Path, arch: str, stages: int = 4) -> None:
    """Load a local weights file into a full torchvision ResNet, or raise a one-line DataError.

    Accepts ``.safetensors`` or a ``torch.save``-d state dict (optionally under "state_dict" or
    "model", optionally with DDP's ``module.`` prefix). The classifier (``fc.*``) may be absent.
    A caption checkpoint (its folder, a run folder or its ``model.safetensors``) gives its
    trained encoder: the first ``stages`` stages, which must match ``arch``.
    """
    path = checkpoint_weights_file(path)
    if not path.is_file():
        names = ", ".join(pretrained_weight_names(arch))
        raise DataError(
            f"{path}: encoder weights file not found (torchvision's pretrained {arch} weights "
            f"are named: {names})"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors, pickle and zip readers raise many types
        raise DataError(f"{path}: not a readable weights file ({first_line(err)})") from err
    _load_resnet_state(net, state, str(path), arch, stages)


ENCODER_PREFIX = "encoder.body."  # a caption checkpoint's encoder keys (CaptionModel.encoder.body)


def _load_resnet_state(net: nn.Module, state, label: str, arch: str, stages: int = 4) -> None:
    """Check a state dict against a torchvision ResNet and load it (``fc.*`` optional).

    A caption checkpoint's state (keys ``encoder.body.*``; the decoder's are ignored) gives
    its encoder: only the first ``stages`` stages need to be there.
    """
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DataError(f"{label}: expected a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    optional = ("fc.",)
    if any(k.startswith(ENCODER_PREFIX) for k in state):  # a caption model: its encoder only
        state = {
            k[len(ENCODER_PREFIX) :]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)
        }
        optional += tuple(f"layer{k}." for k in range(stages + 1, 5))
    own = net.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(optional)]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        for what, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", wrong),
        ):
            if keys:
                parts.append(f"{len(keys)} {what} (e.g. {keys[0]})")
        raise DataError(f"{label}: does not match a torchvision {arch}: {', '.join(parts)}")
    net.load_state_dict(state, strict=False)


def load_encoder_weights(net: nn.Module, weights: str | Path, arch: str, stages: int = 4) -> None:
    """``weights`` into a full torchvision ResNet: an existing local file or caption
    checkpoint, else torchvision's pretrained weights of that name
    (:func:`resolve_pretrained_weights`), else a "file not found" error that lists the names."""
    if not Path(weights).exists():
        member = resolve_pretrained_weights(arch, str(weights))
        if member is not None:
            load_pretrained_weights(net, member, arch)
            return
    load_resnet_weights(net, weights, arch, stages)


class ResNetEncoder(nn.Module):
    """torchvision ResNet without avgpool/fc, average-pooled to a G×G grid of features.

    ``forward(images (B, 3, S, S)) -> features (B, P = G·G, C)``. Frozen (the default) means no
    gradients *and* batch norm kept in eval mode, so its running statistics never move.
    """

    def __init__(
        self,
        arch: str = "resnet18",
        grid_size: int = 7,
        stages: int = 4,
        weights: str | Path | None = None,
        fine_tune: bool = False,
    ) -> None:
        super().__init__()
        import torchvision

        if arch not in ENCODER_ARCHS:
            raise ConfigError(f"unknown encoder {arch!r}; choose one of {', '.join(ENCODER_ARCHS)}")
        net = getattr(torchvision.models, arch)(weights=None)  # weights loaded below
        if weights is not None:
            load_encoder_weights(net, weights, arch, stages)
        layers = [("conv1", net.conv1), ("bn1", net.bn1), ("relu", net.relu)]
        layers += [("maxpool", net.maxpool)]
        layers += [(f"layer{k}", getattr(net, f"layer{k}")) for k in range(1, stages + 1)]
        self.body = nn.Sequential(OrderedDict(layers))  # keys: body.conv1.weight, ...
        self.pool = nn.AdaptiveAvgPool2d(grid_size)
        self.out_channels = _STAGE_CHANNELS[arch][stages - 1]
        self.fine_tune = fine_tune
        self.set_fine_tune(fine_tune)

    def set_fine_tune(self, fine_tune: bool) -> None:
        self.fine_tune = fine_tune
        for p in self.body.parameters():
            p.requires_grad_(fine_tune)
        self.train(self.training)

    def train(self, mode: bool = True) -> ResNetEncoder:
        super().train(mode)
        if not self.fine_tune:
            self.body.eval()  # frozen: batch-norm statistics stay as loaded
        return self

    def forward(self, images: Tensor) -> Tensor:
        x = self.body(images)  # (B, C, S/stride, S/stride)
        x = self.pool(x)  # (B, C, G, G)
        return x.flatten(2).transpose(1, 2)  # (B, P, C)


# --------------------------------------------------------------------------------------------
# Attention and decoder
# --------------------------------------------------------------------------------------------


class SoftAttention(nn.Module):
    """Additive soft attention: ``e_p = wᵀ tanh(W_f f_p + W_h h)``, ``α = softmax_p(e)``.

    ``forward(features (B, P, C), h (B, H), projected=None) -> context (B, C), alpha (B, P)``;
    ``projected`` = :meth:`project_features` (``W_f f``, ``(B, P, A)``) may be passed in so it is
    computed once per image instead of once per step.
    """

    def __init__(self, feature_dim: int, hidden_size: int, attention_dim: int) -> None:
        super().__init__()
        self.feature_proj = nn.Linear(feature_dim, attention_dim)
        self.hidden_proj = nn.Linear(hidden_size, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def project_features(self, features: Tensor) -> Tensor:
        return self.feature_proj(features)  # (B, P, A)

    def forward(
        self, features: Tensor, h: Tensor, projected: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        if projected is None:
            projected = self.project_features(features)  # (B, P, A)
        e = self.score(torch.tanh(projected + self.hidden_proj(h).unsqueeze(1)))  # (B, P, 1)
        alpha = torch.softmax(e.squeeze(2), dim=1)  # (B, P)
        context = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)  # (B, C)
        return context, alpha


class AttentionDecoder(nn.Module):
    """SAT decoder whose recurrence is a :class:`GatedLSTMCell` of any gate family.

    Teacher forcing: :meth:`forward`. Decoding: :meth:`encode_features` once per image, then
    :meth:`step` once per token.
    """

    def __init__(self, config: CaptionConfig) -> None:
        super().__init__()
        cfg = config
        if cfg.vocab_size < 5:
            raise ConfigError("the decoder needs vocab_size (set it from the vocabulary)")
        C, H = cfg.feature_dim, cfg.hidden_size
        self.config = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.attention = SoftAttention(C, H, cfg.attention_dim)
        self.init_h = nn.Linear(C, H)
        self.init_c = nn.Linear(C, H)
        self.f_beta = nn.Linear(H, 1)  # SAT's gating scalar β
        cell_class = GatedLSTMCell
        if cfg.sparse:
            from bbservice.sparse import SparseGatedLSTMCell as cell_class
        self.cell = cell_class(cfg.embed_dim + C, H, gate=cfg.gate)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(H, cfg.vocab_size)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.fc.weight, -0.1, 0.1)
        nn.init.zeros_(self.fc.bias)

    # -- pieces shared by teacher forcing and decoding --------------------------------------

    def encode_features(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-image precomputation: ``projected`` (N, P, A) and the initial ``h``, ``c`` (N, H)."""
        mean = features.mean(dim=1)  # (N, C)
        h = torch.tanh(self.init_h(mean))  # (N, H)
        c = self.init_c(mean)  # (N, H)
        return self.attention.project_features(features), h, c

    def _advance(
        self,
        emb: Tensor,
        h: Tensor,
        c: Tensor,
        features: Tensor,
        projected: Tensor,
        mode: str,
        noise=None,
        matmuls=None,
        generator: torch.Generator | None = None,
    ):
        """One recurrence step from the embedded previous word ``emb`` (N, E)."""
        context, alpha = self.attention(features, h, projected)  # (N, C), (N, P)
        beta = torch.sigmoid(self.f_beta(h))  # (N, 1)
        x = torch.cat([emb, beta * context], dim=1)  # (N, E + C)
        xp = self.cell.input_projection(x)  # (N, k·H)
        h, c, gates = self.cell.recurrent_step(xp, (h, c), mode, noise, matmuls, generator)
        return h, c, alpha, gates

    def step(
        self,
        prev_tokens: Tensor,
        h: Tensor,
        c: Tensor,
        features: Tensor,
        gate_mode: str = "mean",
        projected: Tensor | None = None,
        *,
        matmuls=None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One decoding step; the whole state goes in and comes out.

        Parameters
        ----------
        prev_tokens : (N,) int64, the previous word (``<start>`` first).
        h, c : (N, H) state.
        features : (N, P, C) encoder features.
        gate_mode : ``"mean"`` (deterministic; the exported graph) or ``"sample"``.
        projected : (N, P, A) from :meth:`encode_features`; computed here when ``None``.
        matmuls : from ``self.cell.recurrent_matmuls(N)``, made once per decode (optional).
        generator : torch RNG for sampled gates.

        Returns
        -------
        log_probs (N, V), h (N, H), c (N, H), alpha (N, P).
        """
        if projected is None:
            projected = self.attention.project_features(features)
        emb = self.embedding(prev_tokens)  # (N, E)
        h, c, alpha, _ = self._advance(
            emb, h, c, features, projected, gate_mode, None, matmuls, generator
        )
        log_probs = F.log_softmax(self.fc(self.dropout(h)), dim=1)  # (N, V)
        return log_probs, h, c, alpha

    # -- teacher forcing ---------------------------------------------------------------------

    def forward(
        self,
        features: Tensor,
        captions: Tensor,
        lengths: Tensor,
        gate_mode: str | None = None,
        sample_prob: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Teacher-forced pass (optionally with scheduled sampling).

        Parameters
        ----------
        features : (B, P, C).
        captions : (B, L) int64 ``<start> w1 .. wk <end> <pad>..``; T = L − 1 steps are run.
        lengths : (B,) caption lengths including ``<start>`` and ``<end>``.
        gate_mode : ``None`` (sample in training, mean in eval), ``"sample"`` or ``"mean"``.
        sample_prob : scheduled sampling: at each step t ≥ 1 every caption independently feeds
            its own previous prediction (a draw from the model's distribution) instead of the
            true previous word with this probability.

        Returns
        -------
        logits (B, T, V); alphas (B, T, P) with zeros past each caption's end; kl (B,): the gate
        prior KL summed over each caption's real steps (zeros without a prior).
        """
        B, L = captions.shape
        T = L - 1
        mode = resolve_gate_mode(gate_mode, self.training)
        projected, h, c = self.encode_features(features)
        inputs = self.embedding(captions[:, :-1])  # (B, T, E)
        active = (
            torch.arange(T, device=captions.device).unsqueeze(0) < (lengths - 1).unsqueeze(1)
        ).to(features.dtype)  # (B, T)
        cell = self.cell
        noise = None
        if mode == "sample" and cell.gate.stochastic:
            noise = cell.draw_sequence_noise(T, B, features, generator)
        want_kl = cell.config.kl_weight > 0
        kl = features.new_zeros(B)
        with cell.sequence_noise(B, features):  # sparse cells: one noise draw per caption
            matmuls = cell.recurrent_matmuls(B)
            hs, alphas, step_logits = [], [], []
            for t, emb in enumerate(inputs.unbind(1)):
                if sample_prob > 0.0 and t > 0:
                    with torch.no_grad():
                        probs = torch.softmax(step_logits[-1].detach().float(), dim=1)
                        own = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                        coin = torch.rand(B, device=own.device, generator=generator) < sample_prob
                    emb = torch.where(coin.unsqueeze(1), self.embedding(own), emb)
                step_noise = None if noise is None else noise[t]
                h, c, alpha, gates = self._advance(
                    emb, h, c, features, projected, mode, step_noise, matmuls, generator
                )
                hs.append(h)
                alphas.append(alpha)
                if want_kl:
                    kl = kl + cell.gate.kl(gates.alpha) * active[:, t]
                if sample_prob > 0.0:
                    step_logits.append(self.fc(self.dropout(h)))  # (B, V)
        if step_logits:
            logits = torch.stack(step_logits, dim=1)  # (B, T, V)
        else:
            logits = self.fc(self.dropout(torch.stack(hs, dim=1)))  # (B, T, V)
        alphas_t = torch.stack(alphas, dim=1) * active.unsqueeze(2)  # (B, T, P)
        return logits, alphas_t, kl


# --------------------------------------------------------------------------------------------
# The whole model and its loss
# --------------------------------------------------------------------------------------------


class CaptionLoss(NamedTuple):
    """The batch loss and its parts, each already divided by ``tokens``."""

    total: Tensor
    ce: Tensor  # mean token cross-entropy
    attention: Tensor  # λ-free doubly-stochastic regulariser per token
    kl: Tensor  # weight-free gate prior KL per token
    tokens: int


def caption_loss(
    logits: Tensor,
    alphas: Tensor,
    kl: Tensor,
    captions: Tensor,
    lengths: Tensor,
    attention_reg: float,
    kl_weight: float,
) -> CaptionLoss:
    """SAT's loss: Σ CE + λ·Σ_b Σ_p (1 − Σ_t α_btp)² + kl_weight·Σ KL, divided by the token count.

    ``logits`` (B, T, V), ``alphas`` (B, T, P) zero past each end, ``kl`` (B,), ``captions``
    (B, T + 1), ``lengths`` (B,) including ``<start>``/``<end>``. Tokens are the predicted
    words and ``<end>``: Σ (lengths − 1).
    """
    T = logits.shape[1]
    targets = captions[:, 1 : T + 1]  # (B, T)
    mask = torch.arange(T, device=logits.device).unsqueeze(0) < (lengths - 1).unsqueeze(1)
    tokens = int(mask.sum())
    ce = F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum")
    att = ((1.0 - alphas.float().sum(dim=1)) ** 2).sum()  # Σ_b Σ_p
    kl_sum = kl.float().sum()
    total = (ce + attention_reg * att + kl_weight * kl_sum) / tokens
    return CaptionLoss(total, ce / tokens, att / tokens, kl_sum / tokens, tokens)


class CaptionModel(nn.Module):
    """Encoder + decoder. ``forward(images, captions, lengths, ...)`` = teacher forcing."""

    def __init__(
        self, encoder: ResNetEncoder, decoder: AttentionDecoder, config: CaptionConfig
    ) -> None:
        super().__init__()
        self.encoder, self.decoder, self.config = encoder, decoder, config

    @classmethod
    def build(cls, config: CaptionConfig, load_encoder_weights: bool = True) -> CaptionModel:
        """A freshly initialised model; ``encoder_weights`` is read if given and asked for."""
        encoder = ResNetEncoder(
            config.encoder,
            config.grid_size,
            config.encoder_stages,
            config.encoder_weights if load_encoder_weights else None,
            config.fine_tune,
        )
        return cls(encoder, AttentionDecoder(config), config)

    def forward(
        self,
        images: Tensor,
        captions: Tensor,
        lengths: Tensor,
        gate_mode: str | None = None,
        sample_prob: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        features = self.encoder(images)  # (B, P, C)
        return self.decoder(features, captions, lengths, gate_mode, sample_prob, generator)

    def loss(self, outputs: tuple[Tensor, Tensor, Tensor], captions, lengths) -> CaptionLoss:
        logits, alphas, kl = outputs
        return caption_loss(
            logits,
            alphas,
            kl,
            captions,
            lengths,
            self.config.attention_reg,
            self.config.gate.kl_weight,
        )

    def parameter_counts(self) -> dict[str, int]:
        """Parameters of the encoder, the decoder, the whole model and the trainable part."""
        return {
            "encoder": sum(p.numel() for p in self.encoder.parameters()),
            "decoder": sum(p.numel() for p in self.decoder.parameters()),
            "total": sum(p.numel() for p in self.parameters()),
            "trainable": sum(p.numel() for p in self.parameters() if p.requires_grad),
        }


def count_decoder_parameters(config: CaptionConfig) -> int:
    """Parameters of the decoder a config builds (built on the meta device: no memory, fast)."""
    with torch.device("meta"):
        return sum(p.numel() for p in AttentionDecoder(config).parameters())


def hidden_size_for_budget(config: CaptionConfig, target: int) -> int:
    """The hidden size whose decoder parameter count is closest to ``target``."""
    from dataclasses import replace

    lo, hi = 1, 8192
    while lo < hi:  # smallest H with count >= target (counts grow with H)
        mid = (lo + hi) // 2
        if count_decoder_parameters(replace(config, hidden_size=mid)) < target:
            lo = mid + 1
        else:
            hi = mid
    below = max(lo - 1, 1)
    count = {h: count_decoder_parameters(replace(config, hidden_size=h)) for h in (below, lo)}
    return min(count, key=lambda h: abs(count[h] - target))


# --------------------------------------------------------------------------------------------
# The PyTorch backend of bbservice.decoding
# --------------------------------------------------------------------------------------------


class TorchCaptionStepper:
    """A :class:`bbservice.decoding.Stepper` over a :class:`CaptionModel` in PyTorch.

    ``start(images (B, 3, S, S) float32)`` runs the encoder once (encoder features (B, P, C)
    are accepted too) and returns the state
    ``{"h", "c": (B, H), "features": (B, P, C), "projected": (B, P, A)}``; ``step(tokens (N,),
    state)`` runs :meth:`AttentionDecoder.step`. ``features`` and ``projected`` never change
    during a decode (:attr:`static_keys`). ``gate_mode="sample"`` draws fresh gate noise for
    every row and step from a torch Generator seeded with ``seed``, so S rows of one image are
    S independent stochastic-gate passes.

    Everything crosses as NumPy (a zero-copy view on the CPU; on CUDA a copy per step).
    """

    static_keys = ("features", "projected")

    def __init__(
        self,
        model: CaptionModel,
        gate_mode: str = "mean",
        seed: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.model = model.eval()
        self.gate_mode = resolve_gate_mode(gate_mode, training=False)
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(seed)
        self._matmuls = None

    def _t(self, array: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    @staticmethod
    def _np(tensor: Tensor) -> np.ndarray:
        return tensor.detach().float().cpu().numpy()

    def start(self, inputs: np.ndarray | Tensor) -> dict[str, np.ndarray]:
        """``inputs``: images (B, 3, S, S), or encoder features (B, P, C) computed already."""
        with torch.inference_mode():
            x = inputs if isinstance(inputs, Tensor) else self._t(np.asarray(inputs, np.float32))
            x = x.to(self.device, torch.float32)
            features = self.model.encoder(x) if x.dim() == 4 else x  # (B, P, C)
            projected, h, c = self.model.decoder.encode_features(features)
        self._matmuls = None  # made on the first step of this decode, for its row count
        return {
            "h": self._np(h),
            "c": self._np(c),
            "features": self._np(features),
            "projected": self._np(projected),
        }

    def step(
        self, tokens: np.ndarray, state: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        with torch.inference_mode():
            if self._matmuls is None:  # (pre-packed) recurrent weights: once per decode
                self._matmuls = self.model.decoder.cell.recurrent_matmuls(len(tokens))
            log_probs, h, c, alpha = self.model.decoder.step(
                self._t(tokens.astype(np.int64, copy=False)),
                self._t(state["h"]),
                self._t(state["c"]),
                self._t(state["features"]),
                self.gate_mode,
                self._t(state["projected"]),
                matmuls=self._matmuls,
                generator=self.generator,
            )
        new_state = dict(state, h=self._np(h), c=self._np(c))
        return self._np(log_probs), new_state, self._np(alpha)
