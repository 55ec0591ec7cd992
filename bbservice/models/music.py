"""The piano-roll model: a gated RNN over 88-key frames predicting the next frame.

    frames (B, T, 88) ──GatedLSTM (any family, L layers, locked dropout)──▶ (B, T, H)
        ──locked dropout──▶ Linear(H, 88) ──▶ logits (B, T, 88); p(key on) = σ(logit)

The output at step t predicts frame t + 1; keys are independent Bernoullis given the past.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from torch import Tensor, nn

from bbservice.cells import GatedLSTM, LockedDropout, State
from bbservice.errors import ConfigError
from bbservice.gates import GateConfig, resolve_gate_mode

N_KEYS = 88

# Hidden sizes that put a 2-layer model at GATES.md's ~0.57M parameter budget.
BUDGET_HIDDEN = {
    "lstm": 200,
    "g2": 200,
    "cifg": 232,
    "beta": 161,
    "bbeta3": 177,
    "bbeta5": 148,
    "mlstm": 178,
}


@dataclass
class MusicConfig:
    """Everything that defines a piano-roll model (saved next to every checkpoint)."""

    gate: GateConfig = field(default_factory=lambda: GateConfig(family="bbeta5"))
    hidden_size: int = 148
    num_layers: int = 2
    dropout: float = 0.0
    n_keys: int = N_KEYS
    sparse: bool = False  # sparse variational dropout (bbservice.sparse.SparseGatedLSTM)

    def __post_init__(self) -> None:
        if isinstance(self.gate, dict):
            self.gate = GateConfig(**self.gate)
        if self.hidden_size < 1 or self.num_layers < 1:
            raise ConfigError("hidden_size and num_layers must be >= 1")
        if self.sparse and self.gate.family == "mlstm":
            raise ConfigError("sparse variational dropout does not support the 'mlstm' family")

    @classmethod
    def preset(cls, family: str, **overrides) -> MusicConfig:
        """The ~0.57M-parameter 2-layer configuration of a family (GATES.md budget)."""
        gate_fields = {f.name for f in fields(GateConfig)} - {"family"}
        gate_kw = {k: overrides.pop(k) for k in list(overrides) if k in gate_fields}
        if family not in BUDGET_HIDDEN:
            raise ConfigError(
                f"unknown gate family {family!r}; choose one of {list(BUDGET_HIDDEN)}"
            )
        overrides.setdefault("hidden_size", BUDGET_HIDDEN[family])
        return cls(gate=GateConfig(family=family, **gate_kw), **overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MusicConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class PianoRollModel(nn.Module):
    """Gated RNN + linear read-out with an independent sigmoid per key."""

    def __init__(self, config: MusicConfig) -> None:
        super().__init__()
        self.config = config
        if config.sparse:
            from bbservice.sparse import SparseGatedLSTM as rnn_class
        else:
            rnn_class = GatedLSTM
        self.rnn = rnn_class(
            config.n_keys,
            config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
            dropout=config.dropout,
            gate=config.gate,
        )
        self.output_dropout = LockedDropout(config.dropout)
        self.readout_neurons = None
        if config.sparse:  # sparse VD on the read-out's inputs: top-layer units can die
            from bbservice.sparse import SparseNeurons

            self.readout_neurons = SparseNeurons(config.hidden_size)
        self.readout = nn.Linear(config.hidden_size, config.n_keys)

    def forward(
        self,
        frames: Tensor,
        lengths: Tensor | None = None,
        state: State | None = None,
        *,
        gate_mode: str | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, State]:
        """``frames`` ``(B, T, 88)`` float → logits ``(B, T, 88)`` for frames 2..T+1, state."""
        hidden, state = self.rnn(
            frames, state, gate_mode=gate_mode, lengths=lengths, generator=generator
        )
        hidden = self.output_dropout(hidden, time_dim=1)
        if self.readout_neurons is not None:
            hidden = self.readout_neurons(hidden)
        return self.readout(hidden), state

    @torch.no_grad()
    def init_readout_bias(self, key_frequency: Tensor) -> None:
        """Start at the frequency baseline: output bias = log-odds of each key's frequency.

        Without this, training sits at that baseline for many epochs before it uses the past
        (the reference runs lose 17 JSB epochs there); with it the first epoch is below it.
        """
        p = torch.as_tensor(key_frequency, dtype=torch.float64).clamp(1e-4, 1 - 1e-4)
        self.readout.bias.copy_(torch.log(p) - torch.log1p(-p))

    def kl_loss(self) -> Tensor:
        """λ · prior KL of the last forward pass (0 without a prior)."""
        return self.rnn.kl_loss()

    def sparse_kl(self) -> Tensor:
        """Sparse variational dropout KL of the recurrent layers and the read-out's inputs
        (unweighted; ``sparse=True`` only)."""
        if self.readout_neurons is None:
            raise ConfigError("sparse_kl needs a model built with sparse=True")
        return self.rnn.kl() + self.readout_neurons.kl()

    @torch.no_grad()
    def sparsity(self) -> dict[str, float]:
        """Pruned fraction per level, ``readout`` (its inputs) included (``sparse=True``)."""
        if self.readout_neurons is None:
            raise ConfigError("sparsity needs a model built with sparse=True")
        return {**self.rnn.sparsity(), "readout": self.readout_neurons.sparsity()}

    def step(
        self,
        frame: Tensor,
        h: Tensor,
        c: Tensor,
        gate_mode: str = "mean",
        matmuls: list | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One step with explicit state, as exported to ONNX.

        ``frame`` ``(B, 88)``; ``h``, ``c`` ``(L, B, H)`` → key probabilities ``(B, 88)``, ``h``,
        ``c``. No Python control flow depends on the data. ``matmuls``: one
        ``cell.recurrent_matmuls(B)`` per layer, made once per sequence (optional).
        """
        mode = resolve_gate_mode(gate_mode, self.training)
        x = frame
        hs, cs = [], []
        for layer, cell in enumerate(self.rnn.cells):
            mm = matmuls[layer] if matmuls is not None else None
            state = (h[layer], c[layer])
            h_l, c_l, _ = cell.recurrent_step(
                cell.input_projection(x), state, mode, None, mm, generator
            )
            hs.append(h_l)
            cs.append(c_l)
            x = h_l
        if self.readout_neurons is not None:
            x = self.readout_neurons(x)
        return torch.sigmoid(self.readout(x)), torch.stack(hs), torch.stack(cs)

    def zero_state(self, batch: int, device=None) -> State:
        shape = (self.config.num_layers, batch, self.config.hidden_size)
        zeros = torch.zeros(shape, device=device)
        return zeros, zeros.clone()


def frame_nll_sum(logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """Summed Bernoulli NLL over keys and (masked) frames, in nats.

    ``logits``, ``targets`` ``(B, T, 88)``; ``mask`` ``(B, T)`` of valid predicted frames.
    """
    bce = nn.functional.binary_cross_entropy_with_logits(
        logits.float(), targets.float(), reduction="none"
    ).sum(-1)
    if mask is not None:
        bce = bce * mask
    return bce.sum()


def probability_nll_sum(probs: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """As :func:`frame_nll_sum` from probabilities (for Monte-Carlo averaged predictions)."""
    p = probs.double().clamp(1e-12, 1 - 1e-12)
    y = targets.double()
    nll = -(y * torch.log(p) + (1 - y) * torch.log1p(-p)).sum(-1)
    if mask is not None:
        nll = nll * mask
    return nll.sum()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class TorchMusicStepper:
    """A music stepper (:func:`bbservice.music_generation.generate_rolls`) over a
    :class:`PianoRollModel` in PyTorch: the counterpart of ``OnnxMusicStepper``, as
    :class:`~bbservice.models.caption.TorchCaptionStepper` is for captions.

    ``start(B)`` returns the zero state ``{"h", "c": (L, B, H)}``; ``step(frame (B, 88), state)``
    runs :meth:`PianoRollModel.step` and returns key probabilities ``(B, 88)`` float32 and the
    new state. ``gate_mode="sample"`` draws the gates from a torch Generator seeded with
    ``seed`` (the stochastic mode of ``bbservice generate music`` and of the service).
    """

    def __init__(
        self,
        model: PianoRollModel,
        gate_mode: str = "mean",
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        self.model, self.gate_mode = model, gate_mode
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.matmuls = None

    @torch.no_grad()
    def start(self, batch: int) -> dict[str, Tensor]:
        self.matmuls = [cell.recurrent_matmuls(batch) for cell in self.model.rnn.cells]
        h, c = self.model.zero_state(batch, self.device)
        return {"h": h, "c": c}

    @torch.no_grad()
    def step(self, frame: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
        x = torch.as_tensor(np.ascontiguousarray(frame, dtype=np.float32), device=self.device)
        probs, h, c = self.model.step(
            x, state["h"], state["c"], self.gate_mode, self.matmuls, self.generator
        )
        return probs.float().cpu().numpy(), {"h": h, "c": c}
