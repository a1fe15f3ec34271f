"""Sequence classification: stratified split, accuracy metrics, verdicts, an end-to-end sweep
whose registered model serves predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

from lstm_sweep import diagnostics as dg
from lstm_sweep import metrics as m
from lstm_sweep import predict
from lstm_sweep.config import ConfigError, load_config
from lstm_sweep.data import load_data
from lstm_sweep.run import main
from lstm_sweep.tasks import TaskCache
from lstm_sweep.train import build_model, fit
from tests.helpers import CLASSIFY, ROOT, TINY_CLASSIFY, mlflow_client


def test_stratified_split_keeps_class_proportions() -> None:
    data = load_data(load_config(CLASSIFY))
    overall = np.bincount(np.load(ROOT / "sweeps" / "data" / "digits.npz")["y"]) / 1797
    for part in ("train", "val", "test"):
        y = data.part(part).y.numpy()
        assert np.abs(np.bincount(y, minlength=10) / len(y) - overall).max() < 0.02
    assert len(data.train) + len(data.val) + len(data.test) == 1797
    ids = [set(data.part(p).ids.tolist()) for p in ("train", "val", "test")]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])


def test_scaler_is_fit_on_training_sequences_only() -> None:
    data = load_data(load_config(CLASSIFY))
    train = data.train.x.numpy().reshape(-1, 8)
    assert np.allclose(train.mean(axis=0), 0.0, atol=1e-5)
    assert not np.allclose(data.val.x.numpy().reshape(-1, 8).mean(axis=0), 0.0, atol=1e-3)


def test_sequences_are_read_from_a_long_table(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = [
        {"seq": s, "t": t, "a": rng.normal(), "b": rng.normal(), "label": "up" if s % 2 else "down"}
        for s in range(40)
        for t in range(5)
    ]
    frame = pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # any row order
    frame.to_csv(tmp_path / "seq.csv", index=False)
    sweep = {
        "task": "classification",
        "data": {
            "path": "seq.csv",
            "id_column": "seq",
            "order_column": "t",
            "label_column": "label",
            "features": ["a", "b"],
            "split": [0.5, 0.25, 0.25],
        },
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep))
    data = load_data(load_config(tmp_path / "s.yaml"))
    assert data.classes == ["down", "up"]
    assert data.train.x.shape[1:] == (5, 2)
    first = data.train.ids[0]
    table = pd.DataFrame(rows)
    expected = table[table.seq == first].sort_values("t")["a"].to_numpy()
    center, scale = data.scaler.center[0], data.scaler.scale[0]
    assert np.allclose(data.train.x[0, :, 0].numpy() * scale + center, expected, atol=1e-5)

    frame[~((frame.seq == 3) & (frame.t == 4))].to_csv(tmp_path / "seq.csv", index=False)
    with pytest.raises(ConfigError, match="lengths must agree"):
        load_data(load_config(tmp_path / "s.yaml"))


def test_a_classifier_memorising_random_labels_is_called_overfitting(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "noise.npz", x=rng.normal(size=(160, 6, 4)), y=rng.integers(0, 2, 160))
    sweep = {
        "task": "classification",
        "data": {"path": "noise.npz", "split": [0.5, 0.25, 0.25]},
        "model": {"hidden_size": 64},
        "train": {"max_epochs": 40, "patience": 40, "learning_rate": 0.02, "batch_size": 32},
        "diagnostics": {"level": "basic"},
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep))
    cfg = load_config(tmp_path / "s.yaml")
    task = TaskCache().get(cfg)
    history = fit(build_model(task, cfg), task, cfg)
    last = history.rows[-1]
    assert last[m.TRAIN_ACCURACY] > 0.95
    assert last[m.ACCURACY_GAP] == pytest.approx(last[m.TRAIN_ACCURACY] - last[m.VAL_ACCURACY])
    verdict = dg.judge(history.rows, task.naive_val_loss, cfg.diagnostics.verdict)
    assert verdict.verdict == "overfitting", verdict.reason


def test_monitoring_val_accuracy_maximizes(stores: Path) -> None:
    cfg = load_config(CLASSIFY, ["train.monitor=val_accuracy"])
    assert cfg.direction == "maximize"
    with pytest.raises(ConfigError, match="is to maximize"):
        load_config(CLASSIFY, ["train.monitor=val_accuracy", "study.direction=minimize"])


@pytest.mark.slow
def test_a_tiny_classification_sweep_end_to_end_serves_its_model(
    stores: Path, tmp_path: Path
) -> None:
    args = [
        str(CLASSIFY),
        "--no-progress",
        *(f"--set={s}" for s in TINY_CLASSIFY),
        "--set=train.monitor=val_accuracy",
    ]
    assert main(args) == 0
    study = optuna.load_study(
        study_name="digits-classify", storage=f"sqlite:///{stores / 'optuna.db'}"
    )
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert len(study.trials) == 3
    client = mlflow_client(stores)
    for trial in study.trials:
        run = client.get_run(trial.user_attrs[m.RUN_ID_ATTR])
        wanted = {m.VAL_ACCURACY, m.TRAIN_ACCURACY, m.ACCURACY_GAP, m.VAL_MACRO_F1}
        assert wanted <= set(run.data.metrics)
        history = client.get_metric_history(run.info.run_id, m.VAL_ACCURACY)
        if trial.state.name == "COMPLETE":
            assert trial.value == pytest.approx(max(h.value for h in history))
            files = {a.path for a in client.list_artifacts(run.info.run_id, "diagnostics")}
            assert "diagnostics/worst_val_samples.csv" in files

    experiment = client.get_experiment_by_name("digits-classify").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`lstm_sweep.role` = 'sweep'")
    metrics = parent.data.metrics
    for method in ("lstm", "majority_class", "logistic_regression"):
        assert 0.0 <= metrics[m.baseline(method, "test", "accuracy")] <= 1.0
    assert metrics["lstm_test_accuracy"] > metrics["majority_class_test_accuracy"]
    (version,) = client.search_model_versions("name = 'digits-classify'")
    recommended = client.get_run(parent.info.run_id).data.tags[m.RECOMMENDED_TRIAL_TAG]
    best = client.get_run(study.trials[int(recommended)].user_attrs[m.RUN_ID_ATTR])
    drawn = {a.path for a in client.list_artifacts(best.info.run_id, "diagnostics")}
    assert "diagnostics/val_predictions.png" in drawn  # its confusion matrix
    report = (stores / "reports" / "digits-classify" / "report.md").read_text()
    assert "majority_class" in report and "logistic_regression" in report

    # the registered model serves the training data's own format: labels and probabilities
    out = tmp_path / "labels.csv"
    uri = f"models:/digits-classify/{version.version}"
    tracking = ["--tracking-uri", f"sqlite:///{stores / 'mlflow.db'}"]
    assert (
        predict.main([uri, str(ROOT / "sweeps" / "data" / "digits.npz"), "-o", str(out), *tracking])
        == 0
    )
    table = pd.read_csv(out)
    probabilities = table[[f"p_{c}" for c in range(10)]].to_numpy()
    assert len(table) == 1797 and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (table["predicted"] == probabilities.argmax(axis=1)).all()
    assert (table["predicted"] == table["true"]).mean() > 0.5  # far above the 0.1 of chance


def test_confidently_wrong_ranks_misclassified_samples_by_confidence() -> None:
    probabilities = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
    truth = np.array([1, 1, 1, 0])
    table = dg.confidently_wrong(probabilities, truth, np.array([10, 11, 12, 13]), ["a", "b"], 5)
    assert table["id"].tolist() == [10, 13, 12]
    assert table["predicted"].tolist() == ["a", "b", "a"]
    assert table["p_true"].tolist() == pytest.approx([0.1, 0.2, 0.4])
