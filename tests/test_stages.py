"""The stages' own decisions: whether a study's closing stage is current."""

from __future__ import annotations

from lstm_sweep.config import load_config
from lstm_sweep.stages import closing_settings, with_closing_named
from tests.helpers import QUICK


def test_a_study_finished_before_the_closing_section_had_its_name_stays_finished() -> None:
    asked = closing_settings(load_config(QUICK))
    old_record = {
        "n_trials": 8,
        "report": {**asked, "edge_fraction": 0.1, "near_best": 0.1},
        "reported_by": "host:1",
    }
    assert with_closing_named(old_record)["closing"] == asked
    current = {"n_trials": 8, "closing": asked}
    assert with_closing_named(current) is current
    assert with_closing_named({}) == {}  # nothing recorded yet: nothing is current
