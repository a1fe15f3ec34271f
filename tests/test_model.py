"""The LSTM: shapes, parameter groups, per-layer states, the linear path and the ensemble."""

from __future__ import annotations

import torch

from lstm_sweep.config import ModelConfig
from lstm_sweep.model import GROUPS, Ensemble, LSTMNet, decay_groups, parameter_group


def make(num_layers: int = 2, skip: str = "none", seed: int = 0) -> LSTMNet:
    torch.manual_seed(seed)
    cfg = ModelConfig(num_layers=num_layers, hidden_size=5, dropout=0.2, skip=skip)
    return LSTMNet(3, 10, (4, 2), cfg)


def test_forecaster_predicts_horizon_by_targets() -> None:
    assert make()(torch.randn(7, 10, 3)).shape == (7, 4, 2)


def test_every_parameter_falls_in_one_named_group() -> None:
    groups = {parameter_group(n) for n, _ in make(skip="linear").named_parameters()}
    assert groups == set(GROUPS)
    assert parameter_group("layers.1.weight_hh_l0") == "lstm_recurrent"
    assert parameter_group("layers.0.bias_ih_l0") == "bias"
    assert parameter_group("skip.weight") == "skip"


def test_weight_decay_goes_to_matrices_only() -> None:
    model = make()
    decayed, plain = decay_groups(model, 0.1)
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"])
    biases = {id(p) for n, p in model.named_parameters() if "bias" in n}
    assert biases == {id(p) for p in plain["params"]}


def test_stacked_layers_match_one_multi_layer_lstm_with_the_same_weights() -> None:
    """Separate layers are nn.LSTM(num_layers=3) in eval mode, and hand out every layer."""
    model = make(num_layers=3).eval()
    reference = torch.nn.LSTM(3, 5, num_layers=3, batch_first=True).eval()
    with torch.no_grad():
        for k, layer in enumerate(model.layers):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(reference, f"{name}_l{k}").copy_(getattr(layer, f"{name}_l0"))
    x = torch.randn(4, 10, 3)
    out, states = model.forward_with_states(x)
    assert len(states) == 3 and states[0].shape == (4, 10, 5)
    assert torch.allclose(states[-1], reference(x)[0], atol=1e-6)
    assert torch.equal(out, model(x))


def test_the_linear_path_is_created_last_and_adds_a_linear_map_of_the_window() -> None:
    plain, skipped = make(seed=4), make(skip="linear", seed=4)
    for (name, a), (_, b) in zip(
        plain.named_parameters(), skipped.named_parameters(), strict=False
    ):
        assert torch.equal(a, b), name  # the same draws for everything but the linear path
    x = torch.randn(6, 10, 3)
    with torch.no_grad():
        skipped.skip.weight.zero_()
        skipped.skip.bias.fill_(1.5)
        assert torch.allclose(skipped.eval()(x), plain.eval()(x) + 1.5)


def test_an_ensemble_averages_forecasts_and_class_probabilities() -> None:
    members = [make(seed=s).eval() for s in range(3)]
    x = torch.randn(5, 10, 3)
    with torch.no_grad():
        mean = torch.stack([member(x) for member in members]).mean(dim=0)
        assert torch.allclose(Ensemble(members, classification=False)(x), mean)
        torch.manual_seed(1)
        cfg = ModelConfig(hidden_size=4)
        classifiers = [LSTMNet(3, 10, (6,), cfg).eval() for _ in range(2)]
        logits = Ensemble(classifiers, classification=True)(x)
        probabilities = torch.stack([torch.softmax(c(x), dim=1) for c in classifiers]).mean(0)
        assert torch.allclose(torch.softmax(logits, dim=1), probabilities, atol=1e-6)
