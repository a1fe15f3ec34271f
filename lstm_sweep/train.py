"""The training loop: ``fit(model, data, cfg, callbacks) -> History``.

It reads top to bottom and knows nothing of Optuna or MLflow: after every epoch it appends one
row of metrics to the History and hands the row to each callback (tracker, pruner), any of which
may ask it to stop. Patience-based early stopping and restoring the best weights live here,
because they are part of what a trained model *is*.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn

from lstm_sweep import diagnostics as dg
from lstm_sweep.config import Config, TrainConfig
from lstm_sweep.data import ClassificationData, ForecastData
from lstm_sweep.model import LSTMNet, decay_groups, layer_outputs

TrainingData = ForecastData | ClassificationData

EVAL_BATCH = 4096  # windows per forward pass when only scoring


class Callback(Protocol):
    def on_epoch_end(self, epoch: int, row: dict[str, float]) -> str | None:
        """Look at one epoch's metrics; return a reason to stop training, or None."""


@dataclass
class History:
    """The one record of a training run: every consumer reads its numbers from here."""

    monitor: str = dg.VAL_LOSS  # the metric that picks the best epoch
    rows: list[dict[str, float]] = field(default_factory=list)  # one per epoch, epoch = index
    best_epoch: int = -1
    best_value: float = math.nan  # the monitored metric at the best epoch
    stop_reason: str = "max_epochs"  # max_epochs | patience | pruned | unstable
    unstable_reason: str | None = None
    weights: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # first/best/last
    seconds: float = 0.0

    @property
    def epochs_trained(self) -> int:
        return len(self.rows)

    @property
    def best_val_loss(self) -> float:
        return self.rows[self.best_epoch][dg.VAL_LOSS] if self.best_epoch >= 0 else math.nan

    def column(self, key: str) -> list[float]:
        return [row[key] for row in self.rows if key in row]


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device = 'cuda' but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(data: TrainingData, cfg: Config) -> LSTMNet:
    """A freshly initialised model; the seed fixes its weights and its dropout masks."""
    torch.manual_seed(cfg.train.seed)
    return LSTMNet(data.n_inputs, data.output_shape, cfg.model)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = decay_groups(model, cfg.weight_decay)
    device = next(model.parameters()).device
    fused = device.type in {"cpu", "cuda"}  # one kernel per step instead of one per tensor
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.learning_rate, fused=fused)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=fused)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode outputs for all of ``x``: (n, horizon, targets) forecasts or (n, classes)
    logits."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = torch.cat([model(x[i : i + EVAL_BATCH].to(device)) for i in range(0, len(x), EVAL_BATCH)])
    model.train(was_training)
    return out


def evaluate(
    model: nn.Module, data: TrainingData, part: str, x: torch.Tensor, y: torch.Tensor
) -> dict[str, float]:
    """The training loss in eval mode, and the task's scores, on (x, y) named ``part``."""
    prediction = predict(model, x)
    y = y.to(prediction.device)
    loss_key = {"val": dg.VAL_LOSS, "train": dg.TRAIN_EVAL_LOSS}.get(part, f"{part}_loss")
    return {loss_key: float(data.loss(prediction, y)), **data.score(part, prediction, y)}


def improved(value: float, best: float, minimize: bool, min_delta: float) -> bool:
    if math.isnan(best):
        return math.isfinite(value)
    return value < best - min_delta if minimize else value > best + min_delta


def fixed_subsample(n: int, size: int, seed: int) -> torch.Tensor:
    """A sorted, seeded subset of ``range(n)`` of at most ``size`` indices."""
    if n <= size:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:size].sort().values


def _instability(row: dict[str, float], explode: float) -> str | None:
    for key in (dg.TRAIN_LOSS, dg.VAL_LOSS):
        if not math.isfinite(row[key]):
            return f"{key} became {row[key]}"
    if row.get(dg.GRAD_NORM_MAX, 0.0) > explode:
        return f"gradient norm {row[dg.GRAD_NORM_MAX]:.3g} exceeded {explode:g}"
    return None


def fit(
    model: LSTMNet,
    data: TrainingData,
    cfg: Config,
    callbacks: Sequence[Callback] = (),
    restore_best: bool = True,
) -> History:
    """Train ``model`` until max_epochs, patience, a callback or instability stops it; the
    model ends holding its best epoch's weights, or its last ones without ``restore_best``
    (a final model trained for a fixed number of epochs has no held-out part to pick by)."""
    train, diag = cfg.train, cfg.diagnostics
    level = diag.level
    device = resolve_device(train.device)
    model.to(device).train()
    optimizer = make_optimizer(model, train)
    x, y = data.train.x.to(device), data.train.y.to(device)
    eval_index = fixed_subsample(len(x), diag.eval_subsample, train.seed + 1).to(device)
    val_index = fixed_subsample(len(data.val), diag.hidden_subsample, train.seed + 2)
    params = [p for p in model.parameters() if p.requires_grad]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    batches = torch.Generator().manual_seed(train.seed)
    max_norm = train.grad_clip if train.grad_clip > 0 else math.inf
    history, best_state, since_best = History(monitor=train.monitor), None, 0
    minimize = train.monitor == dg.VAL_LOSS
    started = time.perf_counter()

    for epoch in range(train.max_epochs):
        order = torch.randperm(len(x), generator=batches).to(device)
        losses, norms, group_norms = [], [], []
        for start in range(0, len(x), train.batch_size):
            idx = order[start : start + train.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = data.loss(model(x[idx]), y[idx])
            loss.backward()
            if level == "full":
                group_norms.append(dg.grad_norms_by_group(named))
            if level != "off" or train.grad_clip > 0:
                norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm))
            optimizer.step()
            losses.append(loss.detach())

        row = {dg.TRAIN_LOSS: float(torch.stack(losses).mean())}
        row |= evaluate(model, data, "val", data.val.x, data.val.y)
        if level != "off":
            row |= evaluate(model, data, "train", x[eval_index], y[eval_index])
            row |= dg.honest_gap(row[dg.TRAIN_EVAL_LOSS], row[dg.VAL_LOSS])
            if dg.TRAIN_ACCURACY in row:
                row[dg.ACCURACY_GAP] = row[dg.TRAIN_ACCURACY] - row[dg.VAL_ACCURACY]
            stacked = torch.stack(group_norms) if group_norms else None
            row |= dg.gradient_summary(torch.stack(norms), train.grad_clip, stacked)
        if level == "full":
            values = dg.group_values(model)
            row |= dg.weight_stats(values)
            model.eval()
            with torch.no_grad():
                states = layer_outputs(model.lstm, data.val.x[val_index].to(device))
            model.train()
            row |= dg.hidden_stats(states, diag.saturation, diag.dead_std)
            history.weights.setdefault("first", values)
            history.weights["last"] = values
        history.rows.append(row)

        history.unstable_reason = _instability(row, diag.verdict.explode_grad_norm)
        if history.unstable_reason:
            history.unstable_reason += f" at epoch {epoch}"
            history.stop_reason = "unstable"
            break
        if improved(row[train.monitor], history.best_value, minimize, train.min_delta):
            history.best_epoch, history.best_value, since_best = epoch, row[train.monitor], 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if level == "full":
                history.weights["best"] = values
        else:
            since_best += 1
        reasons = [r for cb in callbacks if (r := cb.on_epoch_end(epoch, row))]
        if reasons:
            history.stop_reason = reasons[0]
            break
        if since_best >= train.patience:
            history.stop_reason = "patience"
            break

    if restore_best and best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    history.seconds = time.perf_counter() - started
    return history


def naive_loss(data: TrainingData, part: str = "val") -> float:
    """The loss of the naive predictor on a part, in the model's own loss: the last value
    carried forward for forecasting, the training class frequencies for classification."""
    return float(data.loss(data.naive_prediction(part), data.part(part).y))


def original_unit_errors(model: nn.Module, data: ForecastData, part: str) -> dict[str, float]:
    """MAE and RMSE of the model on a part, in the target's own units."""
    windows = data.part(part)
    prediction = data.to_original(predict(model, windows.x).cpu().numpy(), windows)
    truth = data.to_original(windows.y.numpy(), windows)
    error = prediction - truth
    return {
        f"{part}_mae": float(np.abs(error).mean()),
        f"{part}_rmse": float(np.sqrt((error**2).mean())),
    }
