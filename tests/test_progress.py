"""The terminal display: bars keep redrawing while nothing else happens; step lines stay off a
stream that is not a terminal."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tqdm import tqdm

from lstm_sweep import progress
from lstm_sweep.progress import Ticker, step


@pytest.fixture
def fast_ticks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "TICK_SECONDS", 0.02)
    monkeypatch.setattr(progress, "POLL_SECONDS", 0.1)


def test_a_bar_redraws_and_polls_while_the_main_thread_is_busy(fast_ticks: None) -> None:
    out = io.StringIO()
    bar = tqdm(total=3, file=out, mininterval=0)
    polls: list[float] = []
    with Ticker(bar, poll=lambda: polls.append(time.monotonic())) as ticking:
        drawn = out.getvalue().count("\r")
        time.sleep(0.5)  # a long epoch: no update from the main thread
        assert ticking is bar
    assert out.getvalue().count("\r") >= drawn + 10
    assert len(polls) >= 2
    after = out.getvalue()
    time.sleep(0.1)
    assert out.getvalue() == after  # the thread stopped with the block


def test_a_disabled_bar_starts_no_thread(fast_ticks: None) -> None:
    ticker = Ticker(tqdm(total=3, disable=True))
    with ticker:
        assert not ticker.thread.is_alive()


def test_a_step_line_stays_off_a_stream_that_is_not_a_terminal(
    capsys: pytest.CaptureFixture[str], fast_ticks: None
) -> None:
    with step("loading", enabled=True):
        time.sleep(0.1)
    assert capsys.readouterr().err == ""


def test_a_bad_sweep_file_is_refused_before_torch_mlflow_and_optuna_load(tmp_path: Path) -> None:
    sweep = Path(__file__).parents[1] / "sweeps" / "quick.yaml"
    probe = (
        "import sys\n"
        "from lstm_sweep.run import main\n"
        f"code = main([{str(sweep)!r}, '--set=model.dropout=2'])\n"
        "print(code, sorted(m for m in ('torch', 'mlflow', 'optuna') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert result.stdout.split("\n")[0] == "2 []", result.stdout + result.stderr
    assert result.stderr.startswith(f"error: {sweep}: model.dropout = 2")
