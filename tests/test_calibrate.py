"""`oneday tune --calibrate`: short runs at several sizes and horizons, E, A, B fitted, the file the planner reads."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from tests.test_tune_helpers import prepared_data, tiny_plan, write_plan


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepared_data(tmp_path_factory)


def test_calibration_writes_what_the_planner_reads(prepared, tmp_path):
    from oneday.planner.calibration import load_calibration
    from oneday.studies.calibrate import HORIZON_FRACTIONS, calibrate_plan

    # 4 heads of 16: calibration widths 16, 32, 64 (budget permitting)
    plan = tiny_plan(prepared, d_model=64, n_head=4, budget_seconds=3600.0)
    plan_path = write_plan(plan, tmp_path)
    runs = []
    result = calibrate_plan(plan_path, hours=0.03, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                            on_run=runs.append)
    assert result.out == tmp_path / "plan.calibration.json"
    widths = sorted({r.d_model for r in runs})
    assert len(widths) >= 2 and widths[-1] <= 64
    assert len(runs) == len(widths) * len(HORIZON_FRACTIONS)
    for width in widths:  # two horizons per size, a factor 4 apart
        tokens = sorted(r.tokens for r in runs if r.d_model == width)
        assert tokens[1] >= 3.9 * tokens[0]
    law = load_calibration(result.out)
    assert (law.alpha, law.beta) == (0.3478, 0.3658)
    assert min(law.E, law.A, law.B) >= 0 and math.isfinite(law.E + law.A + law.B)
    raw = json.loads(result.out.read_text())
    assert raw["format_version"] == 1 and len(raw["points"]) == len(runs)
    assert result.rmse() < 0.2
    assert math.isfinite(result.predicted_plan_loss)


def test_calibration_needs_two_sizes(prepared, tmp_path):
    from oneday.cli import app

    plan = tiny_plan(prepared, d_model=32, n_head=1)
    plan_path = write_plan(plan, tmp_path)
    result = CliRunner().invoke(app, ["tune", str(plan_path), "--calibrate"])
    assert result.exit_code == 2
    assert "two model sizes" in " ".join(result.stderr.split())
