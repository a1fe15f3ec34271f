"""The training loop: ``fit(model, task, cfg, callbacks) -> History``.

It reads top to bottom and knows nothing of Optuna or MLflow: after every epoch it appends one
row of metrics to the History and hands it to each callback (tracker, pruner, stop request),
any of which may ask it to stop by returning a :class:`Stop`. Patience-based early stopping and
restoring the best weights live here, because they are part of what a trained model *is*.
"""

from __future__ import annotations

import enum
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from lstm_sweep import diagnostics as dg
from lstm_sweep import metrics as m
from lstm_sweep.config import Config, TrainConfig
from lstm_sweep.model import LSTMNet, decay_groups

if TYPE_CHECKING:  # at run time the loop needs no more of a Task than its methods
    from lstm_sweep.tasks import Task

EVAL_BATCH = 4096  # windows per forward pass when only scoring


class Stop(enum.StrEnum):
    """Why training ended."""

    MAX_EPOCHS = "max_epochs"
    PATIENCE = "patience"
    PRUNED = "pruned"  # the pruner judged the trial hopeless
    UNSTABLE = "unstable"  # a loss turned non-finite or a gradient exploded
    INTERRUPTED = "interrupted"  # Ctrl-C or SIGTERM asked the sweep to stop

    @property
    def cut_short(self) -> bool:
        """Stopped from outside before the run could show how it would end."""
        return self in (Stop.PRUNED, Stop.INTERRUPTED)


class Interrupted(KeyboardInterrupt):
    """The sweep was asked to stop (Ctrl-C, SIGTERM); the current run ends as failed and is
    retried when the same command runs again."""


@dataclass
class History:
    """The one record of a training run: every consumer reads its numbers from here."""

    monitor: str = m.VAL_LOSS  # the metric that picks the best epoch
    minimize: bool = True
    rows: list[dict[str, float]] = field(default_factory=list)  # one per epoch, epoch = index
    best_epoch: int = -1
    best_value: float = math.nan  # the monitored metric at the best epoch
    stop: Stop = Stop.MAX_EPOCHS
    unstable_reason: str | None = None
    # diagnostics level full: each parameter group's values at the first, best and last epoch
    snapshots: dict[str, tuple[int, dict[str, torch.Tensor]]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def epochs_trained(self) -> int:
        return len(self.rows)

    @property
    def best_row(self) -> dict[str, float]:
        return self.rows[self.best_epoch] if self.best_epoch >= 0 else {}

    def column(self, key: str) -> list[float]:
        return [row[key] for row in self.rows if key in row]


class Callback:
    """A listener of :func:`fit`; every hook is a no-op unless overridden."""

    def on_fit_start(self, model: nn.Module, history: History) -> None:
        """Before the first epoch."""

    def on_epoch_end(self, epoch: int, row: dict[str, float], history: History) -> Stop | None:
        """After each epoch's row is in the history; return a Stop to end training."""
        return None

    def on_fit_end(self, model: nn.Module, history: History) -> None:
        """After training, with the best weights restored."""


class Shifted(Callback):
    """Another callback, told each epoch ``offset`` later: a setting's folds train one after
    another, and their epochs follow each other in one trial (the pruner's steps)."""

    def __init__(self, callback: Callback, offset: int) -> None:
        self.callback, self.offset = callback, offset

    def on_fit_start(self, model: nn.Module, history: History) -> None:
        self.callback.on_fit_start(model, history)

    def on_epoch_end(self, epoch: int, row: dict[str, float], history: History) -> Stop | None:
        return self.callback.on_epoch_end(epoch + self.offset, row, history)

    def on_fit_end(self, model: nn.Module, history: History) -> None:
        self.callback.on_fit_end(model, history)


class StopWhen(Callback):
    """End training after the current epoch once ``requested()`` is true (Ctrl-C, SIGTERM)."""

    def __init__(self, requested: Callable[[], bool]) -> None:
        self.requested = requested

    def on_epoch_end(self, epoch: int, row: dict[str, float], history: History) -> Stop | None:
        return Stop.INTERRUPTED if self.requested() else None


def resolve_device(name: str) -> torch.device:
    """train.device as torch's: auto takes CUDA where present. On CUDA, torch's deterministic
    settings are switched on first (README: where the same seed still differs on a GPU)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        deterministic_cuda()
    return torch.device(name)


def deterministic_cuda() -> None:
    """What torch asks for the same seed to give the same numbers on one GPU, run to run: a
    fixed cuBLAS workspace (read when cuBLAS starts in this process), cuDNN's deterministic
    kernels without autotuning, and a warning from any op that has no deterministic kernel."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def build_model(task: Task, cfg: Config) -> LSTMNet:
    """A freshly initialised model; the seed fixes its weights and its dropout masks."""
    torch.manual_seed(cfg.train.seed)
    return LSTMNet(task.n_inputs, task.steps, task.output_shape, cfg.model)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = decay_groups(model, cfg.weight_decay)
    device = next(model.parameters()).device
    fused = device.type in {"cpu", "cuda"}  # one kernel per step instead of one per tensor
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.learning_rate, fused=fused)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=fused)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off for a block; the model's previous mode afterwards. A model already in eval
    mode is left alone (each switch walks every module: a tenth of a millisecond a pass)."""
    if not model.training:
        yield
        return
    model.eval()
    try:
        yield
    finally:
        model.train()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode outputs for all of ``x``: (n, horizon, targets) forecasts or (n, classes)
    logits, from any module (an LSTMNet, an Ensemble)."""
    device = next(model.parameters()).device
    with eval_mode(model):
        return torch.cat([model(chunk.to(device)) for chunk in x.split(EVAL_BATCH)])


@torch.no_grad()
def predict_with_states(
    model: LSTMNet, x: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:func:`predict`, plus every layer's hidden states of the samples ``keep`` (sorted
    indices into ``x``), from the same forward pass."""
    device = next(model.parameters()).device
    outputs, kept = [], []
    with eval_mode(model):
        for start, chunk in zip(range(0, len(x), EVAL_BATCH), x.split(EVAL_BATCH), strict=True):
            out, states = model.forward_with_states(chunk.to(device))
            outputs.append(out)
            if len(keep) == len(x):  # every sample: no copy
                kept.append(states)
                continue
            here = keep[(keep >= start) & (keep < start + len(chunk))] - start
            kept.append([s[here.to(device)] for s in states])
    return torch.cat(outputs), [torch.cat(layer) for layer in zip(*kept, strict=True)]


def scores(task: Task, part: str, output: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """The loss in eval mode and the task's scores of an output on a part."""
    loss_key = m.TRAIN_EVAL_LOSS if part == "train" else m.on_part(m.VAL_LOSS, part)
    target = target.to(output.device)
    return {loss_key: float(task.loss(output, target)), **task.epoch_scores(part, output, target)}


def improved(value: float, best: float, minimize: bool, min_delta: float) -> bool:
    if math.isnan(best):
        return math.isfinite(value)
    return value < best - min_delta if minimize else value > best + min_delta


def fixed_subsample(n: int, size: int, seed: int) -> torch.Tensor:
    """A sorted, seeded subset of ``range(n)`` of at most ``size`` indices (its own generator:
    the training's random streams are untouched)."""
    if n <= size:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:size].sort().values


def _instability(row: dict[str, float], explode: float) -> str | None:
    for key in (m.TRAIN_LOSS, m.VAL_LOSS):
        if not math.isfinite(row[key]):
            return f"{key} became {row[key]}"
    if row.get(m.GRAD_NORM_MAX, 0.0) > explode:
        return f"gradient norm {row[m.GRAD_NORM_MAX]:.3g} exceeded {explode:g}"
    return None


def fit(
    model: LSTMNet,
    task: Task,
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
    data = task.data
    x, y = data.train.x.to(device), data.train.y.to(device)
    val_x, val_y = data.val.x.to(device), data.val.y.to(device)
    # the gap is no more precise than the validation loss it is compared with: scoring more
    # training windows than the validation part holds costs a small series a fifth of its epoch
    eval_size = min(diag.eval_subsample, len(val_x))
    eval_index = fixed_subsample(len(x), eval_size, train.seed + 1).to(device)
    hidden_index = fixed_subsample(len(val_x), diag.hidden_subsample, train.seed + 2)
    params = [p for p in model.parameters() if p.requires_grad]
    group_index = dg.group_index(model)
    batches = torch.Generator().manual_seed(train.seed)
    max_norm = train.grad_clip if train.grad_clip > 0 else math.inf
    history = History(monitor=train.monitor, minimize=train.monitor != m.VAL_ACCURACY)
    best_state, since_best = None, 0
    for callback in callbacks:
        callback.on_fit_start(model, history)
    started = time.perf_counter()

    for epoch in range(train.max_epochs):
        order = torch.randperm(len(x), generator=batches).to(device)
        losses, norms, param_norms = [], [], []
        for start in range(0, len(x), train.batch_size):
            idx = order[start : start + train.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = task.loss(model(x[idx]), y[idx])
            loss.backward()
            if level == "full":  # one fused norm per parameter gives the total and the groups
                grads = [p.grad for p in params if p.grad is not None]
                per_param = torch.stack(torch._foreach_norm(grads))
                norms.append(torch.linalg.vector_norm(per_param))
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, norms[-1])
                param_norms.append(per_param)
            elif level == "basic" or train.grad_clip > 0:
                norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm))
            optimizer.step()
            losses.append(loss.detach())

        row = {m.TRAIN_LOSS: float(torch.stack(losses).mean())}
        with eval_mode(model):  # one switch for both passes
            if level == "full":  # hidden states ride on the validation pass
                val_output, states = predict_with_states(model, val_x, hidden_index)
            else:
                val_output = predict(model, val_x)
            if level != "off":
                train_output = predict(model, x[eval_index])
        row |= scores(task, "val", val_output, val_y)
        if level != "off":
            row |= scores(task, "train", train_output, y[eval_index])
            row |= dg.honest_gap(row[m.TRAIN_EVAL_LOSS], row[m.VAL_LOSS])
            if m.TRAIN_ACCURACY in row:
                row[m.ACCURACY_GAP] = row[m.TRAIN_ACCURACY] - row[m.VAL_ACCURACY]
            by_group = (
                dg.group_norms(torch.stack(param_norms), group_index) if param_norms else None
            )
            row |= dg.gradient_summary(torch.stack(norms), train.grad_clip, by_group)
        if level == "full":
            row |= dg.weight_norms(model, group_index)
            row |= dg.hidden_stats(states, diag.saturation, diag.dead_std)
            if epoch == 0:
                history.snapshots["first"] = (epoch, dg.group_values(model))
        history.rows.append(row)

        history.unstable_reason = _instability(row, diag.verdict.explode_grad_norm)
        if history.unstable_reason:
            history.unstable_reason += f" at epoch {epoch}"
            history.stop = Stop.UNSTABLE
            break
        if improved(row[train.monitor], history.best_value, history.minimize, train.min_delta):
            history.best_epoch, history.best_value, since_best = epoch, row[train.monitor], 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if level == "full":
                history.snapshots["best"] = (epoch, dg.group_values(model))
        else:
            since_best += 1
        requests = [s for cb in callbacks if (s := cb.on_epoch_end(epoch, row, history))]
        if requests:
            history.stop = requests[0]
            break
        if since_best >= train.patience:
            history.stop = Stop.PATIENCE
            break

    if level == "full" and history.rows:
        history.snapshots["last"] = (len(history.rows) - 1, dg.group_values(model))
    if restore_best and best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    history.seconds = time.perf_counter() - started
    for callback in callbacks:
        callback.on_fit_end(model, history)
    return history
