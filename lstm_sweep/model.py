"""The LSTM network and its parameter groups. Knows nothing of training, Optuna or MLflow."""

from __future__ import annotations

import math

import torch
from torch import nn

from lstm_sweep.config import ModelConfig

# Parameter groups, as diagnostics and weight decay see them. Each layer is an nn.LSTM naming
# its tensors weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0; then head.* and skip.*.
GROUPS = ("lstm_input", "lstm_recurrent", "bias", "head", "skip")


def parameter_group(name: str) -> str:
    """Which of :data:`GROUPS` a named parameter belongs to."""
    if "bias" in name:
        return "bias"
    if "weight_ih" in name:
        return "lstm_input"
    if "weight_hh" in name:
        return "lstm_recurrent"
    return "skip" if name.startswith("skip.") else "head"


class LSTMNet(nn.Module):
    """Stacked LSTM layers reading a sequence; a linear head on the last hidden state; with
    ``skip: linear``, a linear map of the whole input window added to the head's output, so a
    heavily regularised network degrades to an autoregression rather than to noise.

    The layers are separate single-layer nn.LSTMs with dropout between them (what nn.LSTM's own
    ``dropout`` does), so one forward pass can hand every layer's hidden states to diagnostics.
    ``output_shape`` is (horizon, targets) for forecasting, (classes,) for classification.
    """

    def __init__(
        self, n_inputs: int, steps: int, output_shape: tuple[int, ...], cfg: ModelConfig
    ) -> None:
        super().__init__()
        self.output_shape = tuple(output_shape)
        sizes = [n_inputs] + [cfg.hidden_size] * cfg.num_layers
        self.layers = nn.ModuleList(
            nn.LSTM(size_in, cfg.hidden_size, batch_first=True) for size_in in sizes[:-1]
        )
        self.between = nn.Dropout(cfg.dropout)
        self.head_dropout = nn.Dropout(cfg.head_dropout)
        outputs = math.prod(self.output_shape)
        self.head = nn.Linear(cfg.hidden_size, outputs)
        # created last, so the LSTM and the head start from the same draws with or without it
        self.skip = nn.Linear(steps * n_inputs, outputs) if cfg.skip == "linear" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_states(x)[0]

    def forward_with_states(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The output (batch, *output_shape) and every layer's hidden states (batch, steps,
        hidden)."""
        states = []
        h = x
        for k, layer in enumerate(self.layers):
            if k:
                h = self.between(h)
            h, _ = layer(h)
            states.append(h)
        last = self.head_dropout(h[:, -1, :])  # (batch, hidden): final time step
        out = self.head(last)
        if self.skip is not None:
            out = out + self.skip(x.flatten(1))  # (batch, steps * inputs) -> outputs
        return out.view(-1, *self.output_shape), states


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Optimizer parameter groups: weight decay on weight matrices only, never on biases."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]


class Ensemble(nn.Module):
    """The mean of several members' outputs: forecasts averaged; for classification the
    members' class probabilities averaged, returned as log-probabilities so that softmax and
    argmax read them as any member's logits."""

    def __init__(self, members: list[nn.Module], classification: bool) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.classification = classification

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = torch.stack([member(x) for member in self.members])  # (members, batch, ...)
        if self.classification:
            return torch.log(torch.softmax(outputs, dim=-1).mean(dim=0))
        return outputs.mean(dim=0)
