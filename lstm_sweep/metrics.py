"""The one vocabulary: every metric, tag and attribute name the project writes or reads.

Training history rows, MLflow runs, the pruner, the report and the tests all use these
constants; names that depend on a part, a group or a layer are built by the helpers below and
nowhere else.
"""

from __future__ import annotations

import os
import socket

# Per-epoch metrics (MLflow step = epoch)
TRAIN_LOSS = "train_loss"  # running mean over the epoch's steps: dropout on, weights moving
TRAIN_EVAL_LOSS = "train_eval_loss"  # eval mode on a fixed training subsample: comparable to val
VAL_LOSS = "val_loss"  # the training loss, eval mode, on the validation part (model space)
VAL_NMSE = "val_nmse"  # forecast: MSE in the target's units / the naive forecast's MSE
TRAIN_ACCURACY = "train_accuracy"  # classification, eval mode, on the training subsample
VAL_ACCURACY = "val_accuracy"
VAL_BALANCED_ACCURACY = "val_balanced_accuracy"
VAL_MACRO_F1 = "val_macro_f1"
ACCURACY_GAP = "accuracy_gap"  # train_accuracy - val_accuracy
GAP = "gap"  # val_loss - train_eval_loss
GAP_RATIO = "gap_ratio"  # val_loss / train_eval_loss
GRAD_NORM_MEAN = "grad_norm_mean"  # global L2 norm before clipping, over the epoch's steps
GRAD_NORM_MAX = "grad_norm_max"
CLIP_FRACTION = "clip_fraction"  # share of steps whose gradient the clipping changed

# Once per run
BEST_EPOCH = "best_epoch"
EPOCHS_TRAINED = "epochs_trained"
NAIVE_VAL_LOSS = "naive_val_loss"
OVERFIT_ONSET = "overfit_onset_epoch"
OVERFIT_SCORE = "overfit_score"
TRAIN_SECONDS = "train_seconds"  # wall time inside fit()
VAL_MAE = "val_mae"  # forecast, the target's units, at the best epoch
VAL_RMSE = "val_rmse"

# Metrics a run also records at its best epoch, as best_<name>
AT_BEST_EPOCH = (VAL_LOSS, VAL_NMSE, TRAIN_EVAL_LOSS, GAP, VAL_ACCURACY, ACCURACY_GAP)
BEST_VAL_LOSS = "best_val_loss"
# forecasting's baselines, in the order the report lists them; the naive forecast is always
# fitted (the yardstick of MASE and of the collapse check), the others as closing.baselines says
FORECAST_BASELINES = ("naive", "seasonal_naive", "ridge_ar", "ridge_levels", "mlp", "arima")
FOLDS_MEAN = "folds_mean"  # data.folds > 1: the mean of the folds' best monitored values
FOLD_CURVES = (TRAIN_LOSS, TRAIN_EVAL_LOSS, VAL_LOSS)  # an earlier fold's per-epoch metrics

# Tags
ROLE_TAG = "lstm_sweep.role"  # one of ROLES
STUDY_TAG = "optuna.study"
TRIAL_TAG = "optuna.trial_number"
STATE_TAG = "optuna.state"  # the Optuna state name the run's status was mapped from
SEED_TAG = "lstm_sweep.seed"
WORKER_TAG = "lstm_sweep.worker"  # host:pid of the process that trained the run
VERDICT_TAG = "verdict"
VERDICT_REASON_TAG = "verdict_reason"
STOP_REASON_TAG = "stop_reason"
FAILURE_REASON_TAG = "failure_reason"
MODEL_URI_TAG = "model_uri"
FINAL_TAG = "lstm_sweep.final"  # a final run's findings (JSON), to reuse them on a rerun
CHAMPION = "champion"  # the registered model's alias for the current answer: models:/NAME@champion
FINAL_KIND_TAG = "lstm_sweep.final_kind"  # retrained | ensemble
FINAL_RECIPE_TAG = "lstm_sweep.final_recipe"  # what the final model was made of (JSON)
SANITY_TAG = "sanity_warnings"
RANGE_TAG = "range_warnings"
BEST_TRIAL_TAG = "best_trial"
RECOMMENDED_TRIAL_TAG = "recommended_trial"
NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI (Markdown)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # the UI's choice of view for an experiment
EXPERIMENT_KIND = "custom_model_development"  # the classic model-training view, not GenAI

ROLE_SWEEP, ROLE_TRIAL, ROLE_REEVALUATION, ROLE_FINAL = "sweep", "trial", "reevaluation", "final"

# Optuna trial state -> MLflow run status (MLflow's own Optuna integration maps them alike)
COMPLETE, PRUNED, FAIL = "COMPLETE", "PRUNED", "FAIL"
RUN_STATUS = {COMPLETE: "FINISHED", PRUNED: "KILLED", FAIL: "FAILED"}
INTERRUPTED_REASON = "interrupted by the user"
WORKER_LOST_REASON = "worker lost (no heartbeat)"
DATASET_CONTEXT_TRAINING, DATASET_CONTEXT_SWEEP = "training", "sweep"  # how a run used it
EXIT_FAILED = 1  # the command's status when workers or the tracking server were lost
EXIT_INTERRUPTED = 130  # ... when Ctrl-C or SIGTERM stopped it, as a shell reports SIGINT
LEFTOVER_REASON = "its process stopped before the run was closed"  # found so on a restart
# what a sweep does, in order: an interrupt is worded and recorded by it
STAGE_START, STAGE_TRIALS, STAGE_CLOSING, STAGE_REPORT = (
    "start-up",
    "trials",
    "closing stage",
    "report",
)
# a trial run found on resume ending otherwise than Optuna recorded its trial
UNCLOSED_REASON = "the trial failed before its run was closed (a process stopped or a store failed)"
UNRECORDED_REASON = "Optuna recorded the trial as failed (a store failed): it is retried"

# Optuna trial and study attributes
RUN_ID_ATTR = "mlflow_run_id"
WORKER_ATTR = "worker"  # host:pid that ran the trial, to trace a lost worker
PID_NAMESPACE_ATTR = "pid_namespace"  # the process namespace that pid belongs to
VERDICT_ATTR = "verdict"
VERDICT_REASON_ATTR = "verdict_reason"
CONFIG_ATTR = "lstm_sweep.config"  # the study-defining settings, to refuse a changed sweep file
SELECTION_ATTR = "lstm_sweep.selection"  # set once the closing stage has registered its model

# Artifacts
DIAGNOSTICS_DIR = "diagnostics"
WORST_SAMPLES = "worst_val_samples.csv"
WEIGHTS_FILE = "model/state_dict.pt"  # a completed run's best weights, for the closing stage
SELECTION_FILE = "selection.json"  # the closing stage's findings, on the parent run
BASELINES_FOLDER = "baselines"  # the winner's baseline tables, on the parent run (JSON)
REPORT_DIR = "report"

VERDICTS = ("underfitting", "healthy", "overfitting", "unstable", "undecided")


def best(metric: str) -> str:
    """``val_loss`` -> ``best_val_loss``: the metric's value at the run's best epoch."""
    return f"best_{metric}"


def fold(number: int, metric: str) -> str:
    """A metric of an earlier fold, in its setting's run: ``fold0/val_loss``."""
    return f"fold{number}/{metric}"


def on_part(metric: str, part: str) -> str:
    """``val_loss`` on part ``test`` -> ``test_loss``: the same measure on another part."""
    return f"{part}_{metric.removeprefix('val_')}"


def error(part: str, name: str) -> str:
    """A model's error on a part, as Task.errors names it: ``test`` + ``mse`` -> ``test_mse``."""
    return f"{part}_{name}"


def grad_norm(group: str) -> str:
    return f"grad_norm_{group}"


def weight_stat(group: str, stat: str) -> str:
    return f"weight_{group}_{stat}"


def quantile_stat(q: float) -> str:
    """0.05 -> ``q05``: the statistic name of a weight quantile."""
    return f"q{round(q * 100):02d}"


def hidden_stat(kind: str, layer: int) -> str:
    """Per-layer hidden-state statistic: kind is mean_abs, saturated or dead."""
    return f"hidden_{kind}_l{layer}"


def baseline(method: str, part: str, metric: str) -> str:
    """A predictor's error on a part, as a metric of the sweep's parent run."""
    return f"{method}_{part}_{metric}"


def this_process() -> str:
    """host:pid, naming a worker in trials, runs, locks and the report's record."""
    return f"{socket.gethostname()}:{os.getpid()}"


def process_namespace() -> str:
    """The process namespace this pid belongs to (Linux; empty elsewhere): two containers
    may share a host name, never a namespace."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
