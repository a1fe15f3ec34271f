"""Diagnostics against numbers computed by hand or directly with torch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lstm_sweep import diagnostics as dg
from lstm_sweep import metrics as m
from lstm_sweep.config import ModelConfig, VerdictRules
from lstm_sweep.model import LSTMNet


def test_honest_gap_is_difference_and_ratio() -> None:
    assert dg.honest_gap(0.5, 0.75) == {m.GAP: 0.25, m.GAP_RATIO: 1.5}


def small_model() -> LSTMNet:
    torch.manual_seed(3)
    return LSTMNet(2, 4, (2, 1), ModelConfig(hidden_size=3))


def test_gradient_statistics_equal_direct_torch_computation() -> None:
    model = small_model()
    loss = model(torch.randn(5, 4, 2)).pow(2).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    per_param = torch.stack(torch._foreach_norm(grads))[None, :]  # one step
    by_group = dg.group_norms(per_param, dg.group_index(model))[0]
    layer = model.layers[0]
    assert by_group[1] == pytest.approx(float(layer.weight_hh_l0.grad.norm()), rel=1e-5)
    biases = torch.cat([layer.bias_ih_l0.grad, layer.bias_hh_l0.grad, model.head.bias.grad])
    assert by_group[2] == pytest.approx(float(biases.norm()), rel=1e-5)
    total = torch.nn.utils.get_total_norm(grads)
    assert float(by_group.norm()) == pytest.approx(float(total), rel=1e-5)

    steps = torch.tensor([0.5, 2.0, 1.5, 0.25])
    summary = dg.gradient_summary(steps, grad_clip=1.0, by_group=torch.ones(4, 5))
    assert summary[m.GRAD_NORM_MEAN] == pytest.approx(1.0625)
    assert summary[m.GRAD_NORM_MAX] == 2.0
    assert summary[m.CLIP_FRACTION] == 0.5
    assert summary[m.grad_norm("head")] == 1.0


def test_weight_statistics_equal_direct_torch_computation() -> None:
    model = small_model()
    stats = dg.weight_stats(dg.group_values(model))
    norms = dg.weight_norms(model, dg.group_index(model))
    assert stats["weight_head_norm"] == pytest.approx(norms["weight_head_norm"], rel=1e-6)
    assert set(norms) == {
        f"weight_{g}_norm" for g in ("lstm_input", "lstm_recurrent", "bias", "head")
    }
    w = torch.cat([model.head.weight.detach().reshape(-1)])
    assert stats["weight_head_norm"] == pytest.approx(float(w.norm()))
    assert stats["weight_head_mean"] == pytest.approx(float(w.mean()))
    assert stats["weight_head_std"] == pytest.approx(float(w.std()))
    assert stats["weight_head_max_abs"] == pytest.approx(float(w.abs().max()))
    assert stats["weight_head_q50"] == pytest.approx(float(np.percentile(w.numpy(), 50)))
    assert stats["weight_head_q95"] == pytest.approx(float(np.percentile(w.numpy(), 95)))


def test_hidden_statistics_by_hand() -> None:
    # (2 samples, 2 steps, 4 units): a unit at about +-0.98 throughout, one stuck at 0, one
    # at +-0.5, and one at 1 half the time: saturated on some steps, not on average
    h = torch.tensor(
        [
            [[0.99, 0.0, 0.5, 1.0], [0.97, 0.0, 0.5, 0.0]],
            [[-0.98, 0.0, -0.5, 1.0], [-0.98, 0.0, -0.5, 0.0]],
        ]
    )
    stats = dg.hidden_stats([h], saturation=0.95, dead_std=1e-3)
    assert stats["hidden_mean_abs_l0"] == pytest.approx((0.99 + 0.97 + 0.98 + 0.98 + 2 + 2) / 16)
    assert stats["hidden_saturated_l0"] == pytest.approx(1 / 4)  # units, not activations
    assert stats["hidden_dead_l0"] == pytest.approx(1 / 4)  # the unit stuck at 0


def test_column_std_equals_torch_std_even_for_an_almost_constant_unit() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6144, 5, generator=generator).tanh()
    x[:, 0] = 0.7 + 1e-5 * torch.randn(6144, generator=generator)  # a unit that barely moves
    assert torch.allclose(dg.column_std(x), x.std(dim=0), rtol=1e-4, atol=1e-9)
    assert dg.column_std(x[:1]).tolist() == [0.0] * 5


def rows(val: list[float], train: list[float]) -> list[dict[str, float]]:
    return [
        {m.VAL_LOSS: v, m.TRAIN_EVAL_LOSS: t, m.TRAIN_LOSS: t}
        for v, t in zip(val, train, strict=True)
    ]


def test_onset_is_the_best_epoch_when_val_rises_while_train_falls() -> None:
    assert dg.overfit_onset([1.0, 0.5, 0.6, 0.7], [1.0, 0.5, 0.4, 0.3]) == 1
    assert dg.overfit_onset([1.0, 0.5, 0.4, 0.3], [1.0, 0.5, 0.4, 0.3]) is None
    assert dg.overfit_onset([1.0, 0.5, 0.6], [1.0, 0.5, 0.6]) is None  # train rose too
    assert dg.overfit_score([1.0, 0.5, 0.6]) == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("val", "train", "naive", "unstable", "expected"),
    [
        ([1.0, 0.5, 0.6, 0.7], [1.0, 0.4, 0.3, 0.2], 2.0, None, "overfitting"),
        ([1.0, 0.5, 0.45, 0.44], [1.0, 0.5, 0.45, 0.44], 2.0, None, "healthy"),
        ([1.0, 0.99, 0.98], [1.0, 0.99, 0.98], 1.0, None, "underfitting"),
        ([1.0, math.nan], [1.0, math.nan], 2.0, "val_loss became nan", "unstable"),
    ],
)
def test_judge_applies_the_documented_rules(val, train, naive, unstable, expected) -> None:
    verdict = dg.judge(rows(val, train), naive, VerdictRules(), unstable)
    assert verdict.verdict == expected
    assert verdict.reason
    if expected == "overfitting":
        assert verdict.onset_epoch == 1
        assert "40.0%" in verdict.reason


def test_a_trial_cut_short_gets_no_verdict_unless_it_already_overfit() -> None:
    early = rows([1.0, 0.8, 0.7], [1.0, 0.8, 0.7])
    verdict = dg.judge(early, 2.0, VerdictRules(), cut_short="pruned")
    assert verdict.verdict == "undecided"
    assert "pruned after 3 epoch(s)" in verdict.reason
    assert dg.judge(early, 2.0, VerdictRules()).verdict == "healthy"  # a natural end
    rising = rows([1.0, 0.5, 0.6, 0.7], [1.0, 0.4, 0.3, 0.2])
    assert dg.judge(rising, 2.0, VerdictRules(), cut_short="pruned").verdict == "overfitting"


def test_worst_windows_are_ranked_by_mean_absolute_error() -> None:
    truth = np.zeros((4, 2, 1))
    prediction = np.array([1.0, 3.0, 0.0, 2.0])[:, None, None] * np.ones((4, 2, 1))
    times = np.array([["a", "b"], ["c", "d"], ["e", "f"], ["g", "h"]])
    table = dg.worst_windows(truth, prediction, times, ["y"], k=2)
    assert table["window"].tolist() == [1, 3]
    assert table["start"].tolist() == ["c", "g"]
    assert table["mae"].tolist() == [3.0, 2.0]


def test_the_epoch_budget_is_named_when_most_of_the_best_trials_ran_out_of_epochs() -> None:
    from lstm_sweep.config import TrainConfig

    train = TrainConfig(max_epochs=60, patience=10)
    cut = {"epochs_trained": 60, "best_epoch": 52}  # 7 epochs since its best: patience left
    last_chance = {"epochs_trained": 60, "best_epoch": 50}  # 9 since: one more would end it
    ended = {"epochs_trained": 39, "best_epoch": 28}  # patience ended it
    at_the_cap = {"epochs_trained": 60, "best_epoch": 49}  # patience ran out at the last epoch
    warning = dg.budget_warning([cut, last_chance, ended], train)
    assert warning is not None and warning.startswith("train.max_epochs: 2 of the best 3 trial")
    assert "all 60 epochs" in warning and "train.patience (10)" in warning
    assert dg.budget_warning([cut, ended, at_the_cap], train) is None  # one of three
    assert dg.budget_warning([ended, at_the_cap], train) is None
    # a searched budget is each trial's own (a blank one is the file's): 63 epochs of a trial
    # allowed 100 ended by patience
    searched = {"epochs_trained": 63, "best_epoch": 52, "train.max_epochs": 100}
    assert dg.budget_warning([searched, ended], train) is None
    assert dg.budget_warning([{**cut, "train.max_epochs": float("nan")}], train) is not None
    assert "all 60/80 epochs" in str(
        dg.budget_warning(
            [cut, {"epochs_trained": 80, "best_epoch": 75, "train.max_epochs": 80}], train
        )
    )
    assert dg.budget_warning([], train) is None


def test_edge_warning_when_the_best_trials_sit_at_a_range_edge() -> None:
    from lstm_sweep.config import SearchParam

    search = {
        "train.weight_decay": SearchParam(type="float", low=1e-6, high=1e-1, log=True),
        "model.dropout": SearchParam(type="float", low=0.0, high=0.5),
    }
    best = [
        {"train.weight_decay": 0.09, "model.dropout": 0.2},
        {"train.weight_decay": 0.1, "model.dropout": 0.01},
    ]
    warnings = dg.edge_warnings(best, search)
    assert (
        len(warnings) == 1 and "search.train.weight_decay" in warnings[0] and "high" in warnings[0]
    )
