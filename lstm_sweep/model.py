"""The LSTM network and its parameter groups. Knows nothing of training, Optuna or MLflow."""

from __future__ import annotations

import math

import torch
from torch import nn

from lstm_sweep.config import ModelConfig

# Parameter groups, as diagnostics and weight decay see them. nn.LSTM names its tensors
# weight_ih_l{k}, weight_hh_l{k}, bias_ih_l{k}, bias_hh_l{k}; the head is head.weight, head.bias.
GROUPS = ("lstm_input", "lstm_recurrent", "bias", "head")


def parameter_group(name: str) -> str:
    """Which of :data:`GROUPS` a named parameter belongs to."""
    if "bias" in name:
        return "bias"
    if "weight_ih" in name:
        return "lstm_input"
    if "weight_hh" in name:
        return "lstm_recurrent"
    return "head"


class LSTMNet(nn.Module):
    """A stacked LSTM reading a sequence; a linear head on its last hidden state.

    ``output_shape`` is (horizon, targets) for forecasting, (classes,) for classification.
    """

    def __init__(self, n_inputs: int, output_shape: tuple[int, ...], cfg: ModelConfig) -> None:
        super().__init__()
        self.output_shape = tuple(output_shape)
        self.lstm = nn.LSTM(
            n_inputs,
            cfg.hidden_size,
            num_layers=cfg.num_layers,
            batch_first=True,
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,  # nn.LSTM warns otherwise
        )
        self.head_dropout = nn.Dropout(cfg.head_dropout)
        self.head = nn.Linear(cfg.hidden_size, math.prod(self.output_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)  # (batch, steps, hidden)
        last = self.head_dropout(out[:, -1, :])  # (batch, hidden): final time step
        return self.head(last).view(-1, *self.output_shape)  # (batch, *output_shape)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Optimizer parameter groups: weight decay on weight matrices only, never on biases."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]


def layer_outputs(lstm: nn.LSTM, x: torch.Tensor) -> list[torch.Tensor]:
    """Hidden-state sequences of every layer, (batch, window, hidden) each.

    nn.LSTM returns only its last layer's sequence, so the layers are replayed one at a time
    with the same weights; in eval mode (no inter-layer dropout) the last entry equals
    ``lstm(x)[0]``.
    """
    outputs = []
    for k in range(lstm.num_layers):
        layer = nn.LSTM(x.shape[-1], lstm.hidden_size, batch_first=True).to(x.device)
        layer.load_state_dict(
            {
                f"{name}_l0": getattr(lstm, f"{name}_l{k}")
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
            }
        )
        x, _ = layer(x)
        outputs.append(x)
    return outputs
