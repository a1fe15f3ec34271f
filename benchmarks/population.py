"""Several trials in one model: K LSTM forecasters trained as one batched computation on CPU.

A prototype and a measurement, standalone (it does not import lstm_sweep). The members of a
population share the architecture (inputs, hidden size, layers) and differ in learning rate,
weight decay and dropout. The population keeps every member's weights in one (K, P) buffer and
runs the K LSTMs with matrix products batched over members; per member it clips the gradient's
global norm, takes an AdamW step (decoupled decay on weight matrices only), scores the
validation windows every epoch, keeps its best weights and stops on patience or when a pruning
hook (Optuna's, through ask/tell) says so. Stopped members leave the population (its tensors are
compacted), so they stop costing compute.

Variants, on the same synthetic data (a seeded sine plus AR(1) noise):

- ``baseline``: K separate ``nn.LSTM`` + ``nn.Linear`` models trained one after another with
  ``torch.optim.AdamW(fused=True)`` and ``clip_grad_norm_``, as lstm_sweep trains a trial;
- ``hybrid``: member after member through nn.LSTM's own fused kernel, forward and backward;
  only the optimizer, clipping and bookkeeping batched over the population;
- ``vmap``: one member's LSTM written with ``torch.addmm``, batched by ``torch.func.vmap``
  (``vmap`` of ``nn.LSTM`` itself does not run: no batching rule for ``aten::lstm``, checked);
- ``loop``: the LSTM step loop written with ``torch.baddbmm`` over members, autograd per op;
- ``script``: the same step loop under ``torch.jit.script``;
- ``compile``: the same step loop around an LSTM cell under ``torch.compile``; the compile is a
  fixed cost per process, seen in the first-epoch table (a cold inductor cache);
- ``manual``: the same forward with the backward (BPTT) written out in one
  ``torch.autograd.Function`` per layer: autograd sees one node per layer, not ~10 per step.

Figures: ms of wall time per epoch per member (training steps, validation pass, best-weight
bookkeeping), the variants measured epoch against epoch in rotated rounds (the machine's load
drifts), with the median of the per-round ratios to the baseline; a correctness check of every
population variant against nn.LSTM; the best validation losses of ``--quality`` random settings
trained to the end both ways (patience on); and, with ``--optuna``, an ask/tell sweep both ways.

    python benchmarks/population.py                          # small workload, every variant
    python benchmarks/population.py --workload co2 --repeat 2 --epochs 2
    python benchmarks/population.py --variants baseline manual --members 8 16 --threads 1
    python benchmarks/population.py --hidden 16 --quality 0 --optuna 32 --json small.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

MAX_NORM = 1.0  # global gradient-norm clipping, per member
BETAS, EPS = (0.9, 0.999), 1e-8  # AdamW's defaults
EVAL_ROWS = 1024  # members x windows per validation chunk: bounds a batched pass's memory
VARIANTS = ("baseline", "hybrid", "vmap", "loop", "script", "compile", "manual")

Params = dict[str, Tensor]  # name -> stacked (K, ...) tensor; one member's (...) under vmap
Masks = dict[str, Tensor]  # "between{l}": (K, T, b, H) after LSTM layer l; "head": (K, b, H)
Forward = Callable[["Population", Tensor, Masks], Tensor]  # x (K, b, T, in) -> (K, b, horizon)
LayerFn = Callable[[Tensor, Tensor], Tensor]  # xp (K, T, b, 4H), w_hh.mT (K, H, 4H) -> (K, T, b, H)
StopHook = Callable[[int, int, float], bool]  # (member, epoch, val loss) -> prune it now?
TrainStep = Callable[["Population", Tensor, Tensor, Masks], Tensor]  # x, y -> losses (K,)


@dataclass(frozen=True)
class Workload:
    """Shapes of one benchmark problem."""

    window: int
    horizon: int
    n_train: int
    n_val: int
    batch: int
    layers: int
    hidden: int
    epochs: int  # a full training (quality comparison, Optuna sweep)
    patience: int
    inputs: int = 1


WORKLOADS = {
    "small": Workload(
        window=48,
        horizon=1,
        n_train=168,
        n_val=40,
        batch=64,
        layers=1,
        hidden=64,
        epochs=40,
        patience=8,
    ),
    "co2": Workload(
        window=52,
        horizon=4,
        n_train=1500,
        n_val=320,
        batch=64,
        layers=2,
        hidden=64,
        epochs=20,
        patience=5,
    ),
}


@dataclass(frozen=True)
class Setting:
    """One member's (one trial's) hyperparameters; the seed fixes its initial weights and its
    batch order."""

    lr: float
    weight_decay: float
    dropout: float
    seed: int


@dataclass(frozen=True)
class Data:
    x_train: Tensor  # (n, window, inputs)
    y_train: Tensor  # (n, horizon)
    x_val: Tensor
    y_val: Tensor


@dataclass(frozen=True)
class Outcome:
    """One member's training: its best validation loss, that epoch, epochs trained."""

    best_val: float
    best_epoch: int
    epochs: int


def make_data(w: Workload, seed: int = 0) -> Data:
    """Sliding windows over a seeded sine (periods of 52 and 13 steps) plus AR(1) noise,
    standardised on the training part; the validation windows follow the training ones."""
    length = w.n_train + w.n_val + w.window + w.horizon - 1
    shocks = torch.randn(length, generator=torch.Generator().manual_seed(seed)) * 0.3
    noise, level = torch.empty(length), 0.0
    for t in range(length):
        level = 0.7 * level + float(shocks[t])
        noise[t] = level
    steps = torch.arange(length, dtype=torch.float32)
    series = torch.sin(2 * math.pi * steps / 52) + 0.5 * torch.sin(2 * math.pi * steps / 13 + 1)
    series = series + noise
    train_part = series[: w.n_train + w.window + w.horizon - 1]
    series = (series - train_part.mean()) / train_part.std()
    span = series.unfold(0, w.window + w.horizon, 1)  # (windows, window + horizon)
    x, y = span[:, : w.window].unsqueeze(-1).contiguous(), span[:, w.window :].contiguous()
    return Data(x[: w.n_train], y[: w.n_train], x[w.n_train :], y[w.n_train :])


def sample_settings(k: int, seed: int) -> list[Setting]:
    """K random settings: log-uniform lr and weight decay, uniform dropout, distinct seeds."""
    rng = random.Random(seed)
    return [
        Setting(
            lr=10 ** rng.uniform(-4, -2),
            weight_decay=10 ** rng.uniform(-6, -1),
            dropout=rng.uniform(0.0, 0.5),
            seed=1000 * seed + i,
        )
        for i in range(k)
    ]


# --- the baseline: one nn.LSTM model per trial, as lstm_sweep trains it --------------------------


class Net(nn.Module):
    """nn.LSTM and a linear head on the last hidden state; dropout between the LSTM layers, or on
    the last hidden state when there is one layer."""

    def __init__(self, w: Workload, dropout: float) -> None:
        super().__init__()
        self.lstm = nn.LSTM(
            w.inputs,
            w.hidden,
            num_layers=w.layers,
            batch_first=True,
            dropout=dropout if w.layers > 1 else 0.0,
        )
        self.head_dropout = nn.Dropout(dropout if w.layers == 1 else 0.0)
        self.head = nn.Linear(w.hidden, w.horizon)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        return self.head(self.head_dropout(out[:, -1]))


def build_net(w: Workload, s: Setting) -> Net:
    torch.manual_seed(s.seed)
    return Net(w, s.dropout)


def make_adamw(net: Net, s: Setting) -> torch.optim.AdamW:
    """Fused AdamW, weight decay on weight matrices only (lstm_sweep's ``make_optimizer``)."""
    decay = [p for p in net.parameters() if p.dim() >= 2]
    rest = [p for p in net.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": s.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=s.lr, fused=True)


class Separate:
    """K nn.LSTM models, one per setting, each trained as lstm_sweep trains a trial: fused AdamW
    (decay on matrices only), clipping, a validation pass, patience and the pruning hook every
    epoch, best weights kept. One ``epoch()`` trains one epoch of each model still training, one
    after the other: what K trials in turn cost."""

    def __init__(
        self,
        w: Workload,
        data: Data,
        settings: Sequence[Setting],
        patience: int,
        should_stop: StopHook | None = None,
    ) -> None:
        self.w, self.data, self.patience, self.should_stop = w, data, patience, should_stop
        self.nets = [build_net(w, s) for s in settings]
        self.optimizers = [make_adamw(net, s) for net, s in zip(self.nets, settings, strict=True)]
        self.generators = [torch.Generator().manual_seed(s.seed) for s in settings]
        k = len(settings)
        self.best, self.best_epoch = [math.inf] * k, [-1] * k
        self.since_best, self.epochs = [0] * k, [0] * k
        self.best_states: list[dict[str, Tensor] | None] = [None] * k
        self.active = list(range(k))

    def __len__(self) -> int:
        return len(self.active)

    def epoch(self) -> None:
        for member in list(self.active):
            val = self._train_epoch(member)
            epoch = self.epochs[member]
            self.epochs[member] += 1
            if val < self.best[member]:
                self.best[member], self.best_epoch[member] = val, epoch
                self.since_best[member] = 0
                state = self.nets[member].state_dict()
                self.best_states[member] = {k: v.detach().clone() for k, v in state.items()}
            else:
                self.since_best[member] += 1
            pruned = self.should_stop is not None and self.should_stop(member, epoch, val)
            if self.since_best[member] >= self.patience or pruned:
                self.active.remove(member)

    def _train_epoch(self, member: int) -> float:
        """One epoch of one model: its steps, then its validation loss."""
        net, optimizer, w, data = self.nets[member], self.optimizers[member], self.w, self.data
        net.train()
        n = len(data.x_train)
        order = torch.randperm(n, generator=self.generators[member])
        losses = []
        for start in range(0, n, w.batch):
            idx = order[start : start + w.batch]
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(net(data.x_train[idx]), data.y_train[idx])
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), MAX_NORM)
            optimizer.step()
            losses.append(loss.detach())
        float(torch.stack(losses).mean())  # the epoch's training loss, as a sweep logs it
        net.eval()
        with torch.no_grad():
            return float(nn.functional.mse_loss(net(data.x_val), data.y_val))

    def outcomes(self) -> list[Outcome]:
        return [Outcome(*row) for row in zip(self.best, self.best_epoch, self.epochs, strict=True)]


# --- the population: K members' parameters stacked, (K, ...) ------------------------------------


def param_shapes(w: Workload) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, one member's shape, weight decay?) of every parameter, in nn.LSTM's layout (gate
    order i, f, g, o; a layer computes ``x @ w_ih.T + h @ w_hh.T + b_ih + b_hh``)."""
    shapes: list[tuple[str, tuple[int, ...], bool]] = []
    for layer in range(w.layers):
        n_in = w.inputs if layer == 0 else w.hidden
        shapes += [
            (f"w_ih{layer}", (4 * w.hidden, n_in), True),
            (f"w_hh{layer}", (4 * w.hidden, w.hidden), True),
            (f"b_ih{layer}", (4 * w.hidden,), False),
            (f"b_hh{layer}", (4 * w.hidden,), False),
        ]
    return shapes + [("head_w", (w.horizon, w.hidden), True), ("head_b", (w.horizon,), False)]


def short_names(named: dict[str, Tensor]) -> Params:
    """An nn.LSTM model's named tensors (weights or gradients) under the population's names."""
    out = {"head_w": named["head.weight"], "head_b": named["head.bias"]}
    for name, value in named.items():
        if name.startswith("lstm."):  # lstm.weight_ih_l0 -> w_ih0, lstm.bias_hh_l1 -> b_hh1
            kind, rest = name[len("lstm.") :].split("_", 1)
            out[f"{kind[0]}_{rest.replace('_l', '')}"] = value
    return out


class Population:
    """K members' parameters in one (K, P) buffer and their gradients in another. The parameters
    are leaf views of it twice over: stacked, (K, ...) per name (``params``), and per member
    (``members``); backward accumulates into views of ``grad`` in place, so per-member clipping
    and AdamW are a dozen whole-buffer ops per step for every member and tensor at once."""

    def __init__(self, w: Workload, settings: Sequence[Setting]) -> None:
        self.w = w
        self.shapes = param_shapes(w)
        inits = [short_names(dict(build_net(w, s).named_parameters())) for s in settings]
        self.flat = torch.stack(
            [torch.cat([m[name].detach().reshape(-1) for name, _, _ in self.shapes]) for m in inits]
        )
        k, p = self.flat.shape
        self.ids = torch.arange(k)  # row -> member (index into ``settings``)
        is_matrix = torch.cat([torch.full((math.prod(s),), float(d)) for _, s, d in self.shapes])
        self.lr = torch.tensor([s.lr for s in settings]).unsqueeze(1)  # (K, 1)
        wd = torch.tensor([s.weight_decay for s in settings]).unsqueeze(1)
        self.decay = 1 - self.lr * wd * is_matrix  # (K, P): AdamW's decoupled decay factor
        self.keep = torch.tensor([1 - s.dropout for s in settings])  # dropout keep probability
        self.generators = [torch.Generator().manual_seed(s.seed) for s in settings]
        self.exp_avg, self.exp_avg_sq = torch.zeros(k, p), torch.zeros(k, p)
        self.steps = 0
        self.best_flat = self.flat.clone()
        self.best_val = torch.full((k,), math.inf)
        self.best_epoch = torch.full((k,), -1)
        self.since_best = torch.zeros(k, dtype=torch.long)
        self.epochs = torch.zeros(k, dtype=torch.long)
        self._bind()

    def _bind(self) -> None:
        self.grad = torch.zeros_like(self.flat)
        self.params: Params = {}
        self.members: list[Params] = [{} for _ in range(len(self.flat))]
        offset = 0
        for name, shape, _ in self.shapes:
            n = math.prod(shape)
            values, grads = self.flat[:, offset : offset + n], self.grad[:, offset : offset + n]
            self.params[name] = self._leaf(values.view(-1, *shape), grads.view(-1, *shape))
            for member, value, grad in zip(self.members, values, grads, strict=True):
                member[name] = self._leaf(value.view(shape), grad.view(shape))
            offset += n

    @staticmethod
    def _leaf(value: Tensor, grad: Tensor) -> Tensor:
        leaf = value.detach().requires_grad_()
        leaf.grad = grad
        return leaf

    def __len__(self) -> int:
        return len(self.flat)

    def masks(self, b: int) -> Masks:
        """Per-member dropout masks for a batch of ``b`` windows, scaled by 1 / keep."""
        k, w = len(self), self.w
        if w.layers == 1:
            keep = self.keep.view(-1, 1, 1)
            return {"head": (torch.rand(k, b, w.hidden) < keep) / keep}
        keep = self.keep.view(-1, 1, 1, 1)
        shape = (k, w.window, b, w.hidden)
        return {f"between{i}": (torch.rand(shape) < keep) / keep for i in range(w.layers - 1)}

    @torch.no_grad()
    def step(self) -> None:
        """Per-member global-norm clipping, then AdamW, as ``clip_grad_norm_`` and
        ``torch.optim.AdamW`` compute them, on the whole (K, P) buffers."""
        g = self.grad
        norm = torch.linalg.vector_norm(g, dim=1, keepdim=True)
        g.mul_((MAX_NORM / (norm + 1e-6)).clamp_(max=1.0))
        self.steps += 1
        b1, b2 = BETAS
        self.flat.mul_(self.decay)
        self.exp_avg.lerp_(g, 1 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (self.exp_avg_sq.sqrt() / math.sqrt(1 - b2**self.steps)).add_(EPS)
        self.flat.sub_(self.exp_avg.div(denom).mul_(self.lr / (1 - b1**self.steps)))

    def end_epoch(self, val: Tensor, patience: int, should_stop: StopHook | None) -> None:
        """Keep the improved members' weights; drop those out of patience or pruned."""
        ids = self.ids
        improved = val < self.best_val[ids]
        better = ids[improved]
        self.best_val[better] = val[improved]
        self.best_flat[better] = self.flat[improved]
        self.best_epoch[better] = self.epochs[better]
        self.since_best[ids] = torch.where(improved, 0, self.since_best[ids] + 1)
        go_on = self.since_best[ids] < patience
        if should_stop is not None:
            for row, (member, value) in enumerate(zip(ids.tolist(), val.tolist(), strict=True)):
                if should_stop(member, int(self.epochs[member]), value):
                    go_on[row] = False
        self.epochs[ids] += 1
        if not bool(go_on.all()):
            self.compact(go_on)

    def compact(self, rows: Tensor) -> None:
        """Keep only ``rows`` of every per-member tensor (the optimizer's state included)."""
        self.flat = self.flat[rows].contiguous()
        self.exp_avg, self.exp_avg_sq = self.exp_avg[rows], self.exp_avg_sq[rows]
        self.lr, self.decay, self.keep = self.lr[rows], self.decay[rows], self.keep[rows]
        self.generators = [
            g for g, kept in zip(self.generators, rows.tolist(), strict=True) if kept
        ]
        self.ids = self.ids[rows]
        self._bind()

    def outcomes(self) -> list[Outcome]:
        return [
            Outcome(float(v), int(e), int(n))
            for v, e, n in zip(self.best_val, self.best_epoch, self.epochs, strict=True)
        ]


# --- batched forward passes ---------------------------------------------------------------------


def lstm_layer_loop(xp: Tensor, w_hh_t: Tensor) -> Tensor:
    """The recurrence for all members at once: one ``baddbmm`` and a few element-wise ops per
    time step; ``xp`` holds every step's input projection, biases included."""
    k, _, b, g4 = xp.shape
    hidden = g4 // 4
    h = xp.new_zeros(k, b, hidden)
    c = xp.new_zeros(k, b, hidden)
    outputs: list[Tensor] = []
    for x_t in xp.unbind(1):
        gates = torch.baddbmm(x_t, h, w_hh_t)
        act = gates.sigmoid()
        g = gates[:, :, 2 * hidden : 3 * hidden].tanh()
        c = torch.addcmul(act[:, :, hidden : 2 * hidden] * c, act[:, :, :hidden], g)
        h = act[:, :, 3 * hidden :] * c.tanh()
        outputs.append(h)
    return torch.stack(outputs, 1)


def lstm_cell(x_t: Tensor, h: Tensor, c: Tensor, w_hh_t: Tensor) -> tuple[Tensor, Tensor]:
    """One time step of :func:`lstm_layer_loop`, for ``torch.compile``."""
    hidden = h.shape[-1]
    gates = torch.baddbmm(x_t, h, w_hh_t)
    act = gates.sigmoid()
    g = gates[:, :, 2 * hidden : 3 * hidden].tanh()
    c = torch.addcmul(act[:, :, hidden : 2 * hidden] * c, act[:, :, :hidden], g)
    return act[:, :, 3 * hidden :] * c.tanh(), c


def cell_loop(cell: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]) -> LayerFn:
    """The step loop, in Python, around ``cell``."""

    def layer(xp: Tensor, w_hh_t: Tensor) -> Tensor:
        k, _, b, g4 = xp.shape
        h = xp.new_zeros(k, b, g4 // 4)
        c = torch.zeros_like(h)
        outputs = []
        for x_t in xp.unbind(1):
            h, c = cell(x_t, h, c, w_hh_t)
            outputs.append(h)
        return torch.stack(outputs, 1)

    return layer


class LSTMRecurrence(torch.autograd.Function):
    """The recurrence of :func:`lstm_layer_loop` with its backward written out.

    The forward writes every step's gate activations and cell states into preallocated buffers,
    without autograd. The backward runs back through the steps with ~20 ops a step on
    (K, b, H)-sized tensors, which stay in cache, writing the gates' gradients into one buffer;
    the recurrent weights' gradient is then one ``bmm`` over all steps (the input projection's is
    autograd's, outside). Autograd sees one node per layer instead of ~10 per time step.
    """

    @staticmethod
    def forward(ctx: Any, xp: Tensor, w_hh_t: Tensor) -> Tensor:
        k, steps, b, g4 = xp.shape
        hidden = g4 // 4
        acts = torch.empty_like(xp)  # i, f, g, o after their non-linearity
        cells = xp.new_empty(k, steps, b, hidden)
        tanh_cells, hs = torch.empty_like(cells), torch.empty_like(cells)
        h, c = xp.new_zeros(k, b, hidden), xp.new_zeros(k, b, hidden)
        per_step = zip(
            xp.unbind(1),
            acts.unbind(1),
            cells.unbind(1),
            tanh_cells.unbind(1),
            hs.unbind(1),
            strict=True,
        )
        for x_t, a_t, c_t, tc_t, h_t in per_step:
            gates = torch.baddbmm(x_t, h, w_hh_t)
            i, f, g, o = a_t.chunk(4, -1)
            torch.sigmoid(gates, out=a_t)
            torch.tanh(gates[..., 2 * hidden : 3 * hidden], out=g)
            torch.mul(f, c, out=c_t).addcmul_(i, g)
            torch.tanh(c_t, out=tc_t)
            torch.mul(o, tc_t, out=h_t)
            h, c = h_t, c_t
        ctx.save_for_backward(w_hh_t, acts, cells, tanh_cells, hs)
        return hs

    @staticmethod
    def backward(ctx: Any, d_hs: Tensor) -> tuple[Tensor, Tensor]:
        w_hh_t, acts, cells, tanh_cells, hs = ctx.saved_tensors
        k, steps, b, hidden = hs.shape
        d_gates = torch.empty_like(acts)
        upstream = acts.new_empty(k, b, 4 * hidden)  # what multiplies each gate's derivative
        u_i, u_f, u_g, u_o = upstream.chunk(4, -1)
        zeros, one = hs.new_zeros(k, b, hidden), hs.new_ones(())
        a_s, c_s, tc_s = acts.unbind(1), cells.unbind(1), tanh_cells.unbind(1)
        dg_s, dhs_s = d_gates.unbind(1), d_hs.unbind(1)
        w_hh = w_hh_t.transpose(1, 2)
        dh, dc = dhs_s[-1], zeros
        for t in range(steps - 1, -1, -1):
            a, tc, dg = a_s[t], tc_s[t], dg_s[t]
            i, f, g, o = a.chunk(4, -1)
            dc = torch.addcmul(dc, dh, o * (1 - tc * tc))
            torch.mul(dc, g, out=u_i)
            torch.mul(dc, c_s[t - 1] if t else zeros, out=u_f)
            torch.mul(dc, i, out=u_g)
            torch.mul(dh, tc, out=u_o)
            torch.sub(a, a * a, out=dg)  # sigmoid' = s (1 - s) for i, f, o
            torch.addcmul(one, g, g, value=-1, out=dg[..., 2 * hidden : 3 * hidden])  # tanh'
            dg.mul_(upstream)
            if t:
                dc = dc * f
                dh = torch.baddbmm(dhs_s[t - 1], dg, w_hh)
        h_prev = hs[:, :-1].reshape(k, -1, hidden).transpose(1, 2)
        d_w_hh_t = torch.bmm(h_prev, d_gates[:, 1:].reshape(k, -1, 4 * hidden))
        return d_gates, d_w_hh_t


def manual_layer(xp: Tensor, w_hh_t: Tensor) -> Tensor:
    return LSTMRecurrence.apply(xp, w_hh_t)


def batched_forward(layer_fn: LayerFn) -> Forward:
    """The network for K members at once: per layer one ``baddbmm`` projects every time step's
    input, ``layer_fn`` runs the recurrence; dropout masks between layers and before the head."""

    def forward(pop: Population, x: Tensor, masks: Masks) -> Tensor:
        params = pop.params
        k, b, steps, _ = x.shape
        seq = x.transpose(1, 2).reshape(k, steps * b, -1)  # time-major inside each member
        for layer in range(pop.w.layers):
            # Transposed copies: a batched product runs ~1.8x faster on (K, H, 4H) than on
            # the (K, 4H, H) layout of nn.LSTM seen through .mT.
            w_ih_t, w_hh_t = (params[f"{n}{layer}"].mT.contiguous() for n in ("w_ih", "w_hh"))
            bias = (params[f"b_ih{layer}"] + params[f"b_hh{layer}"]).unsqueeze(1)
            xp = torch.baddbmm(bias, seq, w_ih_t).view(k, steps, b, -1)
            hs = layer_fn(xp, w_hh_t)
            if f"between{layer}" in masks:
                hs = hs * masks[f"between{layer}"]
            seq = hs.reshape(k, steps * b, -1)
        last = hs[:, -1]
        if "head" in masks:
            last = last * masks["head"]
        return torch.baddbmm(params["head_b"].unsqueeze(1), last, params["head_w"].mT)

    return forward


def member_forward(params: Params, x: Tensor, masks: Masks) -> Tensor:
    """One member's network written with ``torch.addmm``; ``vmap`` batches it over members."""
    seq = x.transpose(0, 1)  # (T, b, inputs)
    layers = sum(name.startswith("w_hh") for name in params)
    for layer in range(layers):
        w_hh = params[f"w_hh{layer}"]
        hidden = w_hh.shape[1]
        xp = seq @ params[f"w_ih{layer}"].T + params[f"b_ih{layer}"] + params[f"b_hh{layer}"]
        h = xp.new_zeros(xp.shape[1], hidden)
        c = torch.zeros_like(h)
        outputs = []
        for x_t in xp.unbind(0):
            gates = torch.addmm(x_t, h, w_hh.T)
            act = gates.sigmoid()
            g = gates[:, 2 * hidden : 3 * hidden].tanh()
            c = act[:, hidden : 2 * hidden] * c + act[:, :hidden] * g
            h = act[:, 3 * hidden :] * c.tanh()
            outputs.append(h)
        seq = torch.stack(outputs)
        if f"between{layer}" in masks:
            seq = seq * masks[f"between{layer}"]
    last = seq[-1]
    if "head" in masks:
        last = last * masks["head"]
    return torch.addmm(params["head_b"], last, params["head_w"].T)


def vmap_forward(pop: Population, x: Tensor, masks: Masks) -> Tensor:
    return torch.func.vmap(member_forward)(pop.params, x, masks)


def member_output(pop: Population, k: int, x: Tensor, masks: Masks) -> Tensor:
    """Member ``k`` alone, (b, horizon), through nn.LSTM's own fused kernel (``torch._VF.lstm``:
    oneDNN on CPU), one layer at a time so that the population's dropout masks apply."""
    params, w = pop.members[k], pop.w
    zeros = x.new_zeros(1, x.shape[0], w.hidden)
    seq = x.transpose(0, 1)  # (T, b, inputs)
    for layer in range(w.layers):
        weights = [params[f"{n}{layer}"] for n in ("w_ih", "w_hh", "b_ih", "b_hh")]
        seq = torch._VF.lstm(seq, (zeros, zeros), weights, True, 1, 0.0, False, False, False)[0]
        if f"between{layer}" in masks:
            seq = seq * masks[f"between{layer}"][k]
    last = seq[-1]
    if "head" in masks:
        last = last * masks["head"][k]
    return torch.addmm(params["head_b"], last, params["head_w"].T)


def hybrid_forward(pop: Population, x: Tensor, masks: Masks) -> Tensor:
    return torch.stack([member_output(pop, k, x[k], masks) for k in range(len(pop))])


def hybrid_step(pop: Population, x: Tensor, y: Tensor, masks: Masks) -> Tensor:
    """Forward and backward member after member, while its activations are still in cache
    (all forwards first, then one backward, runs the same kernels ~25 % slower at K = 4)."""
    losses = []
    for k in range(len(pop)):
        loss = (member_output(pop, k, x[k], masks) - y[k]).pow(2).mean()
        loss.backward()
        losses.append(loss.detach())
    return torch.stack(losses)


def joint_step(forward: Forward) -> TrainStep:
    """Forward all members at once, then one backward of the sum of their losses."""

    def step(pop: Population, x: Tensor, y: Tensor, masks: Masks) -> Tensor:
        loss = (forward(pop, x, masks) - y).pow(2).mean((1, 2))  # (K,): each member's MSE
        loss.sum().backward()
        return loss.detach()

    return step


class Variant(NamedTuple):
    forward: Forward  # validation, without autograd
    step: TrainStep  # a training step's forward and backward


def make_variants(names: Sequence[str]) -> dict[str, Variant]:
    """The population variants among ``names``; ``compile`` compiles on its first call, and again
    for K = 1 (a specialised shape), without autograd, and after a change of thread count."""
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.fail_on_recompile_limit_hit = True  # never fall back to eager silently
    forwards: dict[str, Callable[[], Forward]] = {
        "vmap": lambda: vmap_forward,
        "loop": lambda: batched_forward(lstm_layer_loop),
        "script": lambda: batched_forward(torch.jit.script(lstm_layer_loop)),
        "compile": lambda: batched_forward(cell_loop(torch.compile(lstm_cell, dynamic=True))),
        "manual": lambda: batched_forward(manual_layer),
    }
    variants = {name: Variant(hybrid_forward, hybrid_step) for name in names if name == "hybrid"}
    for name in names:
        if name in forwards:
            forward = forwards[name]()
            variants[name] = Variant(forward, joint_step(forward))
    return variants


@torch.no_grad()
def validate(pop: Population, data: Data, forward: Forward) -> Tensor:
    """Every member's validation MSE, (K,), in chunks of windows that bound the memory."""
    k, n = len(pop), len(data.x_val)
    chunk = max(1, EVAL_ROWS // k)
    total = torch.zeros(k)
    for start in range(0, n, chunk):
        x, y = data.x_val[start : start + chunk], data.y_val[start : start + chunk]
        total += (forward(pop, x.expand(k, *x.shape), {}) - y).pow(2).sum((1, 2))
    return total / data.y_val.numel()


class Batched:
    """K settings trained as one population: one ``epoch()`` trains every member still in it,
    each on its own batch order, with its own dropout, clipping and AdamW step."""

    def __init__(
        self,
        w: Workload,
        data: Data,
        settings: Sequence[Setting],
        variant: Variant,
        patience: int,
        should_stop: StopHook | None = None,
    ) -> None:
        self.pop = Population(w, settings)
        self.data, self.variant = data, variant
        self.patience, self.should_stop = patience, should_stop

    def __len__(self) -> int:
        return len(self.pop)

    def epoch(self) -> None:
        pop, data = self.pop, self.data
        n, batch = len(data.x_train), pop.w.batch
        orders = torch.stack([torch.randperm(n, generator=g) for g in pop.generators])
        losses = []
        for start in range(0, n, batch):
            idx = orders[:, start : start + batch]  # (K, b)
            pop.grad.zero_()
            masks = pop.masks(idx.shape[1])
            losses.append(self.variant.step(pop, data.x_train[idx], data.y_train[idx], masks))
            pop.step()
        torch.stack(losses).mean(0).tolist()  # the members' training losses, as a sweep logs them
        val = validate(pop, data, self.variant.forward)
        pop.end_epoch(val, self.patience, self.should_stop)

    def outcomes(self) -> list[Outcome]:
        return self.pop.outcomes()


Trainer = Separate | Batched


def run(trainer: Trainer, epochs: int) -> list[float]:
    """Up to ``epochs`` epochs, until every member has stopped; each epoch's seconds."""
    seconds: list[float] = []
    while len(trainer) and len(seconds) < epochs:
        started = time.perf_counter()
        trainer.epoch()
        seconds.append(time.perf_counter() - started)
    return seconds


# --- correctness --------------------------------------------------------------------------------


def check_vmap_of_nn_lstm(w: Workload) -> str:
    """Does ``vmap(functional_call)`` over ``stack_module_state`` of nn.LSTMs run?"""
    nets = [build_net(w, s).lstm for s in sample_settings(2, 0)]
    params, buffers = torch.func.stack_module_state(nets)
    x = torch.randn(4, w.window, w.inputs)

    def call(p: Params, b: Params) -> Tensor:
        return torch.func.functional_call(nets[0], (p, b), (x,))[0]

    try:
        torch.func.vmap(call)(params, buffers)
    except RuntimeError as error:
        return "fails: " + str(error).splitlines()[0]
    return "runs"


def grads_of(named: Iterable[tuple[str, Tensor]]) -> Params:
    return {name: p.grad.clone() for name, p in named if p.grad is not None}


def max_diff(a: Params, b: Params) -> float:
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def check_correctness(w: Workload, data: Data, variants: dict[str, Variant]) -> dict[str, Any]:
    """Every batched variant against 3 nn.LSTM models with the same weights, dropout off: the
    largest absolute difference of the forward outputs, of the gradients, and of the weights
    after one step (forward, backward, clipping, AdamW) on the same batch; and ``gradcheck`` of
    the hand-written backward in float64."""
    settings = [replace(s, dropout=0.0) for s in sample_settings(3, 7)]
    x, y = data.x_train[: w.batch], data.y_train[: w.batch]
    ref_out, ref_grad, ref_step = [], [], []
    for s in settings:
        net = build_net(w, s)
        optimizer = make_adamw(net, s)
        out = net(x)
        ref_out.append(out.detach())
        nn.functional.mse_loss(out, y).backward()
        ref_grad.append(short_names(grads_of(net.named_parameters())))
        nn.utils.clip_grad_norm_(net.parameters(), MAX_NORM)
        optimizer.step()
        ref_step.append(short_names({n: p.detach().clone() for n, p in net.named_parameters()}))

    def stacked(per_member: list[Params]) -> Params:
        return {name: torch.stack([m[name] for m in per_member]) for name in per_member[0]}

    report: dict[str, Any] = {"vmap of nn.LSTM": check_vmap_of_nn_lstm(w)}
    xs = x.expand(len(settings), *x.shape)
    for name, variant in variants.items():
        pop = Population(w, settings)
        with torch.no_grad():
            out = variant.forward(pop, xs, {})
        variant.step(pop, xs, y.expand(len(settings), *y.shape), {})
        grads = grads_of(pop.params.items())
        pop.step()
        report[name] = {
            "forward": float((out - torch.stack(ref_out)).abs().max()),
            "grad": max_diff(grads, stacked(ref_grad)),
            "step": max_diff({n: p.detach() for n, p in pop.params.items()}, stacked(ref_step)),
        }
    xp = torch.randn(2, 5, 3, 16, dtype=torch.float64, requires_grad=True)
    w_hh_t = (torch.randn(2, 4, 16, dtype=torch.float64) * 0.5).requires_grad_()
    report["gradcheck manual backward"] = torch.autograd.gradcheck(
        LSTMRecurrence.apply, (xp, w_hh_t)
    )
    return report


# --- measurements -------------------------------------------------------------------------------


def make_trainer(
    name: str,
    w: Workload,
    data: Data,
    settings: Sequence[Setting],
    built: dict[str, Variant],
    patience: int,
    should_stop: StopHook | None = None,
) -> Trainer:
    if name == "baseline":
        return Separate(w, data, settings, patience, should_stop)
    return Batched(w, data, settings, built[name], patience, should_stop)


def timed_epoch(trainer: Trainer) -> float:
    started = time.perf_counter()
    trainer.epoch()
    return time.perf_counter() - started


@dataclass
class Cell:
    """One (threads, K, variant) cell of the timing grid."""

    ms: list[float] = field(default_factory=list)  # per epoch per member
    ratio: list[float] = field(default_factory=list)  # to the baseline's epoch of the same round
    first_s: float = math.nan  # the first epoch of the first repetition, warm-up included


def measure(
    w: Workload,
    data: Data,
    names: Sequence[str],
    built: dict[str, Variant],
    members: Sequence[int],
    threads: Sequence[int],
    repeat: int,
    epochs: int,
) -> list[dict[str, Any]]:
    """Per repetition, thread count and K: fresh trainers of every variant on the same K settings
    (patience off), one warm-up epoch each, then ``epochs`` rounds in which every variant trains
    one epoch, in an order rotated each round. Variants are compared epoch against epoch, seconds
    apart, which is what a machine whose load drifts allows."""
    cells: dict[tuple[int, int, str], Cell] = {}
    for rep in range(repeat):
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            for k in members:
                settings = sample_settings(k, seed=rep)
                trainers = {
                    v: make_trainer(v, w, data, settings, built, patience=epochs + 2) for v in names
                }
                for name, trainer in trainers.items():
                    first = timed_epoch(trainer)
                    cell = cells.setdefault((n_threads, k, name), Cell())
                    if rep == 0:
                        cell.first_s = first
                for round_ in range(epochs):
                    turn = round_ % len(names)
                    order = [*names[turn:], *names[:turn]]
                    seconds = {v: timed_epoch(trainers[v]) for v in order}
                    for v, s in seconds.items():
                        cells[(n_threads, k, v)].ms.append(1000 * s / k)
                        cells[(n_threads, k, v)].ratio.append(s / seconds.get("baseline", math.nan))
                summary = " ".join(
                    f"{v} {statistics.median(cells[(n_threads, k, v)].ms[-epochs:]):.1f}"
                    for v in names
                )
                print(
                    f"  rep {rep} threads {n_threads} K {k:2d} ms/epoch/member: {summary}",
                    flush=True,
                )
    return [
        {
            "threads": n_threads,
            "members": k,
            "variant": name,
            "ms_per_epoch_per_member": statistics.median(cell.ms),
            "vs_baseline": statistics.median(cell.ratio),
            "first_epoch_s": cell.first_s,
            "ms_samples": cell.ms,
        }
        for (n_threads, k, name), cell in cells.items()
    ]


def quality(w: Workload, data: Data, n: int, name: str, variant: Variant) -> dict[str, Any]:
    """``n`` random settings trained to the end (patience on) as separate models and as one
    population: each setting's best validation loss and epochs, and both wall times."""
    settings = sample_settings(n, seed=12345)
    separate = Separate(w, data, settings, w.patience)
    separate_s = sum(run(separate, w.epochs))
    batched = Batched(w, data, settings, variant, w.patience)
    batched_s = sum(run(batched, w.epochs))
    rows = [
        {**asdict(s), "baseline": asdict(a), name: asdict(b)}
        for s, a, b in zip(settings, separate.outcomes(), batched.outcomes(), strict=True)
    ]
    return {"variant": name, "baseline_s": separate_s, "batched_s": batched_s, "settings": rows}


def pruning_hook(trials: Sequence[Any], pruned: set[int]) -> StopHook:
    """Report each member's validation loss to its Optuna trial; stop it when the pruner says
    so (and remember it in ``pruned``)."""

    def should_stop(member: int, epoch: int, val: float) -> bool:
        trials[member].report(val, epoch)
        if trials[member].should_prune():
            pruned.add(member)
        return member in pruned

    return should_stop


def optuna_sweep(
    w: Workload, data: Data, trials: int, k: int, name: str, built: dict[str, Variant]
) -> dict[str, Any]:
    """An in-memory Optuna study (TPE with constant liar, median pruner) of ``trials`` trials
    through ask/tell: ``k`` trials asked at once, trained together, each told its own result
    (pruned ones as pruned). Every trial has seed 0, as in an lstm_sweep sweep."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=8, constant_liar=True),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=5),
    )
    started = time.perf_counter()
    while len(study.trials) < trials:
        asked = [study.ask() for _ in range(min(k, trials - len(study.trials)))]
        settings = [
            Setting(
                lr=t.suggest_float("lr", 1e-4, 1e-2, log=True),
                weight_decay=t.suggest_float("weight_decay", 1e-6, 1e-1, log=True),
                dropout=t.suggest_float("dropout", 0.0, 0.5),
                seed=0,
            )
            for t in asked
        ]
        pruned: set[int] = set()
        hook = pruning_hook(asked, pruned)
        trainer = make_trainer(name, w, data, settings, built, w.patience, hook)
        run(trainer, w.epochs)
        for member, (trial, outcome) in enumerate(zip(asked, trainer.outcomes(), strict=True)):
            trial.set_user_attr("epochs", outcome.epochs)
            if member in pruned:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(trial, outcome.best_val)
    return {
        "variant": name,
        "members": k,
        "seconds": time.perf_counter() - started,
        "best_value": study.best_value,
        "epochs_trained": sum(t.user_attrs["epochs"] for t in study.trials),
        "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
    }


# --- output -------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    with open("/proc/cpuinfo") as cpuinfo:
        models = [
            line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")
        ]
    with open("/proc/loadavg") as loadavg:
        load = loadavg.read().split()[:3]
    return {
        "nproc": os.cpu_count(),
        "cpu": models[0] if models else "?",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_at_start": load,
    }


def print_table(
    rows: list[dict[str, Any]],
    variants: Sequence[str],
    threads: Sequence[int],
    members: Sequence[int],
) -> None:
    cell = {(r["threads"], r["members"], r["variant"]): r for r in rows}
    for n_threads in threads:
        print(f"\nthreads {n_threads}: ms per epoch per member, median (median ratio to baseline)")
        print(f"{'variant':9s}" + "".join(f"{'K=' + str(k):>16s}" for k in members))
        for variant in variants:
            line = "".join(
                f"{cell[(n_threads, k, variant)]['ms_per_epoch_per_member']:8.1f} "
                f"({cell[(n_threads, k, variant)]['vs_baseline']:4.2f})"
                for k in members
            )
            print(f"{variant:9s}{line}")
    print("\nfirst epoch of the first repetition, s (TorchScript profiling, torch.compile)")
    heads = [f"t{t} K={k}" for t in threads for k in members]
    print(f"{'variant':9s}" + "".join(f"{h:>10s}" for h in heads))
    for variant in variants:
        firsts = [cell[(t, k, variant)]["first_epoch_s"] for t in threads for k in members]
        print(f"{variant:9s}" + "".join(f"{f:10.2f}" for f in firsts))


def print_quality(q: dict[str, Any]) -> None:
    variant = q["variant"]
    print(f"\nbest val loss per setting, patience on: baseline vs {variant} (epochs trained)")
    print(f"{'lr':>9s} {'decay':>9s} {'dropout':>7s} {'baseline':>13s} {variant:>13s}")
    for r in q["settings"]:
        a, b = r["baseline"], r[variant]
        print(
            f"{r['lr']:9.2e} {r['weight_decay']:9.2e} {r['dropout']:7.2f} "
            f"{a['best_val']:8.4f} ({a['epochs']:2d}) {b['best_val']:8.4f} ({b['epochs']:2d})"
        )
    for side in ("baseline", variant):
        values = sorted(r[side]["best_val"] for r in q["settings"])
        print(
            f"{side:9s} min {values[0]:.4f}  median {statistics.median(values):.4f}  "
            f"mean {statistics.mean(values):.4f}  max {values[-1]:.4f}"
        )
    ratio = q["batched_s"] / q["baseline_s"]
    print(f"wall: baseline {q['baseline_s']:.1f} s, {variant} {q['batched_s']:.1f} s ({ratio:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="small")
    parser.add_argument("--members", type=int, nargs="+", default=[1, 4, 8, 16], help="K values")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of every cell")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after a warm-up one")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--hidden", type=int, help="override the workload's hidden size")
    parser.add_argument(
        "--quality", type=int, default=8, help="settings trained to the end both ways (0: skip)"
    )
    parser.add_argument("--quality-variant", choices=VARIANTS[1:], default="manual")
    parser.add_argument(
        "--optuna", type=int, default=0, help="trials of an ask/tell sweep, both ways (0: skip)"
    )
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()
    # A cold compile cache (inductor reads the variable at its first compile), so the compile
    # time reported is what a fresh machine pays.
    with tempfile.TemporaryDirectory(prefix="population-inductor-") as cache:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache)
        report(args)


def report(args: argparse.Namespace) -> None:
    """Every figure the arguments ask for, printed, and written as JSON with ``--json``."""

    warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout")
    w = WORKLOADS[args.workload]
    if args.hidden:
        w = replace(w, hidden=args.hidden)
    data = make_data(w)
    variants = [v for v in VARIANTS if v in args.variants]
    info = {"workload": args.workload, **asdict(w), **machine(), "argv": sys.argv[1:]}
    print(json.dumps(info))
    built = make_variants([*variants, args.quality_variant])
    results: dict[str, Any] = {"machine": info}
    results["timing"] = measure(
        w, data, variants, built, args.members, args.threads, args.repeat, args.epochs
    )
    print_table(results["timing"], variants, args.threads, args.members)
    torch.set_num_threads(max(args.threads))
    results["correctness"] = check_correctness(w, data, built)
    print(
        "\ncorrectness, max abs difference to nn.LSTM:",
        json.dumps(results["correctness"], indent=1),
    )
    if args.quality:
        results["quality"] = quality(
            w, data, args.quality, args.quality_variant, built[args.quality_variant]
        )
        print_quality(results["quality"])
    if args.optuna:
        results["optuna"] = [
            optuna_sweep(w, data, args.optuna, 1, "baseline", built),
            optuna_sweep(w, data, args.optuna, max(args.members), args.quality_variant, built),
        ]
        print(f"\nask/tell sweep of {args.optuna} trials (threads {max(args.threads)}):")
        for r in results["optuna"]:
            print(
                f"  {r['variant']:8s} K={r['members']:2d} {r['seconds']:7.1f} s"
                f"  best {r['best_value']:.4f}  epochs {r['epochs_trained']}  pruned {r['pruned']}"
            )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
