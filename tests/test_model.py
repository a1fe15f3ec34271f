"""The LSTM forecaster: shapes, parameter groups, per-layer states."""

from __future__ import annotations

import torch

from lstm_sweep.config import ModelConfig
from lstm_sweep.model import GROUPS, LSTMNet, decay_groups, layer_outputs, parameter_group


def make(num_layers: int = 2) -> LSTMNet:
    torch.manual_seed(0)
    return LSTMNet(3, (4, 2), ModelConfig(num_layers=num_layers, hidden_size=5, dropout=0.2))


def test_forecaster_predicts_horizon_by_targets() -> None:
    assert make()(torch.randn(7, 10, 3)).shape == (7, 4, 2)


def test_every_parameter_falls_in_one_named_group() -> None:
    groups = {parameter_group(n) for n, _ in make().named_parameters()}
    assert groups == set(GROUPS)
    assert parameter_group("lstm.weight_hh_l1") == "lstm_recurrent"
    assert parameter_group("lstm.bias_ih_l0") == "bias"


def test_weight_decay_goes_to_matrices_only() -> None:
    model = make()
    decayed, plain = decay_groups(model, 0.1)
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"])
    biases = {id(p) for n, p in model.named_parameters() if "bias" in n}
    assert biases == {id(p) for p in plain["params"]}


def test_layer_outputs_replay_the_stack_exactly_in_eval_mode() -> None:
    model = make(num_layers=3).eval()
    x = torch.randn(4, 6, 3)
    layers = layer_outputs(model.lstm, x)
    assert len(layers) == 3
    assert torch.allclose(layers[-1], model.lstm(x)[0], atol=1e-6)
