"""Overfitting diagnostics as pure functions of tensors and floats, returning plain dicts.

The metric names below are the project's one vocabulary: the training history, MLflow, the
pruner, the report and the tests all use these constants.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from lstm_sweep.config import Config, SearchParam, VerdictRules
from lstm_sweep.model import GROUPS, parameter_group

TRAIN_LOSS = "train_loss"  # running mean over the epoch's steps: dropout on, weights moving
TRAIN_EVAL_LOSS = "train_eval_loss"  # eval mode on a fixed training subsample: comparable to val
VAL_LOSS = "val_loss"
TRAIN_ACCURACY = "train_accuracy"  # classification, eval mode, on the training subsample
VAL_ACCURACY = "val_accuracy"
ACCURACY_GAP = "accuracy_gap"  # train_accuracy - val_accuracy
GAP = "gap"  # val_loss - train_eval_loss
GAP_RATIO = "gap_ratio"  # val_loss / train_eval_loss
GRAD_NORM_MEAN = "grad_norm_mean"  # global L2 norm before clipping, over the epoch's steps
GRAD_NORM_MAX = "grad_norm_max"
CLIP_FRACTION = "clip_fraction"  # share of steps whose gradient the clipping changed
BEST_VAL_LOSS = "best_val_loss"
BEST_EPOCH = "best_epoch"
EPOCHS_TRAINED = "epochs_trained"
NAIVE_VAL_LOSS = "naive_val_loss"
OVERFIT_ONSET = "overfit_onset_epoch"
OVERFIT_SCORE = "overfit_score"
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)

VERDICTS = ("underfitting", "healthy", "overfitting", "unstable")


def honest_gap(train_eval_loss: float, val_loss: float) -> dict[str, float]:
    """Gap between validation and training loss, both measured in eval mode."""
    ratio = val_loss / train_eval_loss if train_eval_loss > 0 else math.inf
    return {GAP: val_loss - train_eval_loss, GAP_RATIO: ratio}


def grad_norms_by_group(named: Sequence[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """L2 norm of the gradients of each parameter group, in :data:`GROUPS` order: (groups,).

    ``named`` holds (name, parameter) pairs, as ``model.named_parameters()`` gives them.
    """
    squares = torch.zeros(len(GROUPS), device=named[0][1].device)
    for name, param in named:
        if param.grad is not None:
            squares[GROUPS.index(parameter_group(name))] += param.grad.pow(2).sum()
    return squares.sqrt()


def gradient_summary(
    step_norms: torch.Tensor, grad_clip: float, group_norms: torch.Tensor | None = None
) -> dict[str, float]:
    """Epoch statistics of per-step gradient norms (before clipping).

    ``step_norms`` is (steps,); ``group_norms`` is (steps, groups) when recorded.
    """
    summary = {
        GRAD_NORM_MEAN: float(step_norms.mean()),
        GRAD_NORM_MAX: float(step_norms.max()),
        CLIP_FRACTION: float((step_norms > grad_clip).float().mean()) if grad_clip > 0 else 0.0,
    }
    if group_norms is not None:
        means = group_norms.mean(dim=0)
        summary |= {f"grad_norm_{g}": float(means[i]) for i, g in enumerate(GROUPS)}
    return summary


def group_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter group's values flattened into one tensor."""
    parts: dict[str, list[torch.Tensor]] = {g: [] for g in GROUPS}
    for name, param in model.named_parameters():
        parts[parameter_group(name)].append(param.detach().reshape(-1))
    return {g: torch.cat(p).float().cpu() for g, p in parts.items() if p}


def weight_stats(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per group: L2 norm, mean, std, largest |w| and fixed quantiles (MLflow has no histogram)."""
    stats: dict[str, float] = {}
    levels = torch.tensor(QUANTILES)
    for group, w in values.items():
        stats[f"weight_{group}_norm"] = float(w.norm())
        stats[f"weight_{group}_mean"] = float(w.mean())
        stats[f"weight_{group}_std"] = float(w.std()) if w.numel() > 1 else 0.0
        stats[f"weight_{group}_max_abs"] = float(w.abs().max())
        for q, value in zip(QUANTILES, torch.quantile(w, levels), strict=True):
            stats[f"weight_{group}_q{int(q * 100):02d}"] = float(value)
    return stats


def hidden_stats(
    layers: Iterable[torch.Tensor], saturation: float = 0.95, dead_std: float = 1e-3
) -> dict[str, float]:
    """Per layer: mean |h|, share of units saturated (|h| > saturation on average over samples
    and steps) and share of units that never move (std over samples and steps < dead_std)."""
    stats: dict[str, float] = {}
    for k, h in enumerate(layers):
        flat = h.detach().reshape(-1, h.shape[-1]).float()  # (samples * steps, hidden)
        stats[f"hidden_mean_abs_l{k}"] = float(flat.abs().mean())
        stats[f"hidden_saturated_l{k}"] = float((flat.abs() > saturation).float().mean())
        std = flat.std(dim=0) if len(flat) > 1 else torch.zeros(flat.shape[1])
        stats[f"hidden_dead_l{k}"] = float((std < dead_std).float().mean())
    return stats


@dataclass(frozen=True)
class Verdict:
    verdict: str  # one of VERDICTS
    reason: str  # one sentence with the numbers
    onset_epoch: int | None  # the epoch after which val rose while train kept falling
    score: float  # relative rise of val from its best to the last epoch


def overfit_onset(val: Sequence[float], train: Sequence[float]) -> int | None:
    """The best-val epoch, if val rose after it while training loss kept falling; else None."""
    best = int(np.argmin(val))
    if best == len(val) - 1 or val[-1] <= val[best] or train[-1] >= train[best]:
        return None
    return best


def overfit_score(val: Sequence[float]) -> float:
    """How far validation loss rose from its best by the last epoch, relative to the best."""
    best = float(np.min(val))
    return (float(val[-1]) - best) / best if best > 0 else 0.0


def judge(
    rows: Sequence[dict[str, float]],
    naive_val_loss: float,
    rules: VerdictRules,
    unstable_reason: str | None = None,
) -> Verdict:
    """Turn a trial's per-epoch rows into a verdict. The rules, in order:

    1. unstable: the loss turned NaN/inf or a gradient norm exceeded ``explode_grad_norm``.
    2. overfitting: the model fits its training data (final training loss, eval mode, below
       ``underfit_naive_ratio`` x the naive predictor's loss) and either val rose after its
       best epoch while training loss kept falling (the onset), ending ``overfit_rise`` above
       its best or ``overfit_gap_ratio`` above the training loss; or, for classification,
       train accuracy ended more than ``overfit_accuracy_gap`` above val accuracy.
    3. underfitting: the best val loss is above ``underfit_naive_ratio`` x the naive
       predictor's (the last value carried forward, or the majority class).
    4. healthy otherwise.
    """
    val = [r[VAL_LOSS] for r in rows if math.isfinite(r.get(VAL_LOSS, math.nan))]
    if unstable_reason or not val:
        return Verdict("unstable", unstable_reason or "no finite validation loss", None, math.nan)
    last = rows[len(val) - 1]
    train_key = TRAIN_EVAL_LOSS if TRAIN_EVAL_LOSS in last else TRAIN_LOSS
    train = [r[train_key] for r in rows[: len(val)]]
    best = min(val)
    onset, score = overfit_onset(val, train), overfit_score(val)
    ratio = val[-1] / train[-1] if train[-1] > 0 else math.inf
    fits_train = train[-1] < rules.underfit_naive_ratio * naive_val_loss
    if (
        fits_train
        and onset is not None
        and (score >= rules.overfit_rise or ratio > rules.overfit_gap_ratio)
    ):
        return Verdict(
            "overfitting",
            f"val loss rose {score:.1%} from its best {best:.4g} at epoch {onset} while"
            f" {train_key} fell to {train[-1]:.4g} (val/train {ratio:.2f})",
            onset,
            score,
        )
    accuracy_gap = last.get(ACCURACY_GAP, -math.inf)
    if fits_train and accuracy_gap > rules.overfit_accuracy_gap:
        return Verdict(
            "overfitting",
            f"train accuracy {last[TRAIN_ACCURACY]:.1%} ended {accuracy_gap:.1%} above val"
            f" accuracy {last[VAL_ACCURACY]:.1%} (limit {rules.overfit_accuracy_gap:.0%})",
            onset,
            score,
        )
    if best > rules.underfit_naive_ratio * naive_val_loss:
        return Verdict(
            "underfitting",
            f"best val loss {best:.4g} is not below {rules.underfit_naive_ratio:g} x the naive"
            f" predictor's {naive_val_loss:.4g} (train {train[-1]:.4g})",
            onset,
            score,
        )
    return Verdict(
        "healthy",
        f"best val loss {best:.4g} ({best / naive_val_loss:.2f} x naive), val ended"
        f" {score:.1%} above its best, val/train {ratio:.2f}",
        onset,
        score,
    )


def worst_windows(
    truth: np.ndarray, prediction: np.ndarray, times: np.ndarray, targets: list[str], k: int
) -> pd.DataFrame:
    """The k windows with the largest mean absolute error, worst first, one row per window.

    ``truth`` and ``prediction`` are (n, horizon, targets) in original units, ``times`` is
    (n, horizon).
    """
    error = np.abs(prediction - truth).mean(axis=(1, 2))  # (n,)
    order = np.argsort(-error)[:k]
    rows = []
    for i in order:
        row: dict[str, object] = {"window": int(i), "start": str(times[i, 0]), "mae": error[i]}
        for t, name in enumerate(targets):
            row[f"{name}_true"] = truth[i, :, t].round(6).tolist()
            row[f"{name}_pred"] = prediction[i, :, t].round(6).tolist()
        rows.append(row)
    return pd.DataFrame(rows)


def config_warnings(cfg: Config) -> list[str]:
    """Settings that cannot do what the user probably thinks they do."""
    warnings = []
    layers = cfg.search.get("model.num_layers")
    can_stack = cfg.model.num_layers > 1 or (layers is not None and max(layers.bounds()) > 1)
    if not can_stack and (cfg.model.dropout > 0 or "model.dropout" in cfg.search):
        warnings.append(
            "model.dropout is nn.LSTM's dropout between layers: with num_layers = 1 it does"
            " nothing; use model.head_dropout or more layers"
        )
    optimizers = cfg.search.get("train.optimizer")
    uses_adam = cfg.train.optimizer == "adam" or (
        optimizers is not None and "adam" in optimizers.bounds()
    )
    decays = cfg.train.weight_decay > 0 or "train.weight_decay" in cfg.search
    if uses_adam and decays:
        warnings.append(
            "train.optimizer = adam couples weight_decay into the gradient (L2, scaled by Adam's"
            " step size), unlike adamw's decoupled decay: the same value means less there"
        )
    return warnings


def edge_warnings(
    best: Sequence[Mapping[str, Any]], search: Mapping[str, SearchParam], margin: float = 0.05
) -> list[str]:
    """Searched keys whose best trials all sit at one edge of the range: widen it."""
    warnings = []
    for key, param in search.items():
        if param.type == "categorical" or not best:
            continue
        low, high = float(param.low), float(param.high)  # type: ignore[arg-type]
        scale = (lambda v: math.log(v)) if param.log else (lambda v: v)
        span = scale(high) - scale(low)
        if span <= 0:
            continue
        positions = [(scale(float(t[key])) - scale(low)) / span for t in best if key in t]
        for edge, near in (
            ("low", all(p <= margin for p in positions)),
            ("high", all(p >= 1 - margin for p in positions)),
        ):
            if positions and near:
                warnings.append(
                    f"search.{key}: the best {len(positions)} trial(s) sit at the {edge} edge of"
                    f" [{low:g}, {high:g}]; widen the range"
                )
    return warnings


def confidently_wrong(
    probabilities: np.ndarray, truth: np.ndarray, ids: np.ndarray, classes: list[str], k: int
) -> pd.DataFrame:
    """The k misclassified samples the model was surest of, surest first.

    ``probabilities`` is (n, classes); ``truth`` and ``ids`` are (n,).
    """
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities[np.arange(len(truth)), predicted]
    wrong = np.flatnonzero(predicted != truth)
    order = wrong[np.argsort(-confidence[wrong], kind="stable")][:k]
    return pd.DataFrame(
        {
            "id": ids[order],
            "true": [classes[i] for i in truth[order]],
            "predicted": [classes[i] for i in predicted[order]],
            "confidence": confidence[order],
            "p_true": probabilities[order, truth[order]],
        }
    )
