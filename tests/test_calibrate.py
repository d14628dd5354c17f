"""`oneday tune --calibrate`: short runs at several sizes and horizons, E, A, B fitted, the file the planner reads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.test_tune_helpers import prepared_data, tiny_plan, write_plan


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepared_data(tmp_path_factory)


def test_calibration_writes_what_the_planner_reads(prepared, tmp_path):
    from oneday.planner.calibration import load_calibration
    from oneday.studies.calibrate import HORIZON_FRACTIONS, calibrate_plan

    # 4 heads of 16: calibration widths 16 and 32, never the plan's own 64
    plan = tiny_plan(prepared, d_model=64, n_head=4, budget_seconds=3600.0)
    plan_path = write_plan(plan, tmp_path)
    runs = []
    result = calibrate_plan(plan_path, hours=0.03, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                            on_run=runs.append)
    assert result.out == tmp_path / "plan.calibration.json"
    widths = sorted({r.d_model for r in runs})
    assert widths == [16, 32]
    assert len(runs) == len(widths) * len(HORIZON_FRACTIONS)
    for width in widths:  # two horizons per size, a factor 4 apart
        tokens = sorted(r.tokens for r in runs if r.d_model == width)
        assert tokens[1] >= 3.9 * tokens[0]
    law = load_calibration(result.out)
    assert (law.alpha, law.beta) == (0.3478, 0.3658)
    assert min(law.E, law.A, law.B) >= 0 and math.isfinite(law.E + law.A + law.B)
    raw = json.loads(result.out.read_text())
    assert raw["format_version"] == 1 and len(raw["points"]) == len(runs)
    assert result.rmse() < 0.5  # a sane fit; tiny time-boxed runs on a loaded 2-core machine scatter by ~0.1-0.3
    assert math.isfinite(result.predicted_plan_loss)
    kept = json.loads((prepared.directory / "calibration.json").read_text())  # kept with the data for later plans
    assert kept["points"] == raw["points"] and kept["data"]["key"] == prepared.key


def test_calibration_needs_two_sizes(prepared, tmp_path):
    from oneday.cli import app

    plan = tiny_plan(prepared, d_model=24, n_head=1)  # only 16 is narrower and at least 16 wide
    plan_path = write_plan(plan, tmp_path)
    result = CliRunner().invoke(app, ["tune", str(plan_path), "--calibrate"])
    assert result.exit_code == 2
    assert "two model sizes" in " ".join(result.stderr.split())
    assert "calibration runs" not in result.stderr  # one line: no empty table of runs above it


# --- the fit and its band (pure) ---------------------------------------------------------------------------
TRUE = dict(E=2.3, A=60.0, B=900.0)


def _truth():
    from oneday.planner.laws import EPOCH_2024

    return EPOCH_2024.calibrated(**TRUE, source="synthetic")


def _grid():
    # what calibration runs give: three widths, two horizons each (a factor 4 apart), small N and D
    return [(n, d) for n in (2e5, 8e5, 3.2e6) for d in (n * 5, n * 20)]


def test_fit_recovers_known_e_a_b():
    from oneday.planner.calibration import fit_law

    truth = _truth()
    fit = fit_law([(n, d, truth.loss(n, d)) for n, d in _grid()])
    assert fit.free == ("E", "A", "B")
    fitted = (fit.law.E, fit.law.A, fit.law.B)
    assert fitted == pytest.approx((2.3, 60.0, 900.0), rel=1e-6)
    assert fit.sigma == pytest.approx(0.0, abs=1e-9)
    # few points: E held (at the data's bound), A and B from the runs
    held = fit_law([(n, d, truth.loss(n, d)) for n, d in _grid()[:3]], fixed_e=2.3)
    assert held.free == ("A", "B") and held.law.E == 2.3
    fitted_ab = (held.law.A, held.law.B)
    assert fitted_ab == pytest.approx((60.0, 900.0), rel=1e-6)


def test_e_never_passes_the_unigram_entropy():
    from oneday.planner.calibration import fit_law

    truth = _truth()
    fit = fit_law([(n, d, truth.loss(n, d)) for n, d in _grid()], max_e=2.0)
    assert fit.law.E == 2.0 and fit.free == ("A", "B")
    three = fit_law([(n, d, truth.loss(n, d)) for n, d in _grid()[:3]], max_e=1.5)
    assert three.law.E == 1.5  # too few points for a free E: held at min(published E, the bound)


def test_the_band_covers_new_runs():
    # 200 synthetic calibrations with noisy runs (σ = 0.03 nats, a run's seed-to-seed spread at this scale);
    # the band at the plan's (larger) N, D must hold a new noisy run about 95% of the time
    import random

    from oneday.planner.calibration import fit_law

    truth = _truth()
    rng = random.Random(17)
    n_plan, d_plan = 6e6, 2.4e8
    covered = 0
    widths = []
    for _ in range(200):
        fit = fit_law([(n, d, truth.loss(n, d) + rng.gauss(0, 0.03)) for n, d in _grid()])
        low, high = fit.loss_band(n_plan, d_plan)
        widths.append(high - low)
        covered += low <= truth.loss(n_plan, d_plan) + rng.gauss(0, 0.03) <= high
    assert covered >= 0.88 * 200
    assert sorted(widths)[100] < 1.5  # and says something: the median band is narrower than 1.5 nats


def test_no_degree_of_freedom_no_band():
    from oneday.planner.calibration import fit_law

    truth = _truth()
    fit = fit_law([(n, d, truth.loss(n, d)) for n, d in _grid()[:3]])
    assert fit.degrees_of_freedom() == 1  # E held: A, B from three points
    exact = fit_law([(n, d, truth.loss(n, d)) for n, d in _grid()[:2]], fixed_e=2.3)
    assert exact.loss_band(1e6, 1e8) == (-math.inf, math.inf)
    assert not exact.decisive(1e6, 1e8, tolerance=0.1)


def test_an_uncalibrated_law_above_the_unigram_entropy_is_a_bound_not_a_prediction():
    from oneday.planner.calibration import presented_loss
    from oneday.planner.laws import EPOCH_2024, HOFFMANN_2022

    # the 3-minute built-in plan: the law says 31.5 (19.5 under the band law), ln V = 8.81, H ≈ 6.4
    shown = presented_loss(law_loss=31.48, band_loss=19.46, laws=(EPOCH_2024, HOFFMANN_2022), vocab_size=6720,
                           unigram_entropy=6.4)
    assert shown.basis == "bound" and shown.loss == 6.4 and shown.ceiling == 6.4
    assert shown.band == (HOFFMANN_2022.E, 6.4)
    assert shown.band[0] <= 3.86 <= shown.band[1]  # what 2×64 reached on it
    # no token counts: ln V is the ceiling
    assert presented_loss(law_loss=31.48, band_loss=19.46, laws=(EPOCH_2024,), vocab_size=6720,
                          unigram_entropy=None).loss == pytest.approx(math.log(6720))
    # within range: the law's figure, the band from E to the higher law
    inside = presented_loss(law_loss=3.1, band_loss=3.3, laws=(EPOCH_2024, HOFFMANN_2022), vocab_size=50304,
                            unigram_entropy=7.5)
    assert inside.basis == "law" and inside.loss == 3.1 and inside.band == (HOFFMANN_2022.E, 3.3)
    # calibrated: the fit's band, cut at the ceiling
    fitted = presented_loss(law_loss=4.0, band_loss=9.0, laws=(EPOCH_2024,), vocab_size=6720, unigram_entropy=6.4,
                            fit_band=(3.7, 7.0))
    assert fitted.basis == "calibrated" and fitted.band == (3.7, 6.4) and fitted.loss == 4.0


# --- calibrations kept with the data; what a plan presents ------------------------------------------------
def _plan(cache, **kw):
    from oneday.planner.make import make_plan

    return make_plan(**{**dict(hours=1 / 60, data="builtin:pydoc", vocab_size=512, device="cpu", probe_seconds=2.0,
                               cache_dir=cache, command="test"), **kw})


def _payload(law, points):
    return {"format_version": 1, "name": "pydoc-fit", "E": law.E, "A": law.A, "B": law.B, "alpha": law.alpha,
            "beta": law.beta, "source": "synthetic runs", "points": [list(p) for p in points]}


def test_a_kept_calibration_is_offered_and_dropped_when_the_data_changes(tmp_path):
    import shutil

    from oneday.planner.calibration import cached_calibration, save_cached_calibration

    entry = tmp_path / "entry"
    entry.mkdir()
    meta = {"key": "k1", "vocab_size": 512, "xxh3_64": {"train.bin": "aaaa", "val.bin": "bbbb"}}
    (entry / "meta.json").write_text(json.dumps(meta))
    truth = _truth()
    points = [(n, d, truth.loss(n, d)) for n, d in _grid()]
    assert cached_calibration(entry) is None  # nothing kept yet
    assert save_cached_calibration(entry, _payload(truth, points)) == entry / "calibration.json"
    kept = cached_calibration(entry)
    assert kept is not None and kept.law.E == truth.E and kept.points == tuple(points)
    # a fit kept before validation was scored on windows spread over the whole set: its losses are other numbers
    record = json.loads((entry / "calibration.json").read_text())
    del record["data"]["val_windows"]
    (entry / "calibration.json").write_text(json.dumps(record))
    assert cached_calibration(entry) is None
    save_cached_calibration(entry, _payload(truth, points))
    # the token files were prepared again with other bytes: the fit belongs to other data
    (entry / "meta.json").write_text(json.dumps({**meta, "xxh3_64": {"train.bin": "cccc", "val.bin": "bbbb"}}))
    assert cached_calibration(entry) is None
    # another corpus or tokenizer is another key: its entry has no calibration, even a copied one
    other = tmp_path / "other"
    shutil.copytree(entry, other)
    (other / "meta.json").write_text(json.dumps({**meta, "key": "k2"}))
    assert cached_calibration(other) is None
    # a read-only cache is a warning, not a failure
    ro = tmp_path / "missing" / "entry"
    assert save_cached_calibration(ro, _payload(truth, points)) is None


def test_a_plan_reuses_the_calibration_kept_with_its_data(tmp_path):
    from oneday.data.prepare import prepare_data
    from oneday.planner.calibration import save_cached_calibration

    cache = tmp_path / "cache"
    prepared = prepare_data("builtin:pydoc", vocab_size=512, cache_dir=cache)
    law = _truth().calibrated(E=2.0, A=20.0, B=150.0, source="synthetic")  # below the unigram entropy at this scale
    points = [(n, d, law.loss(n, d) + 0.01 * (-1) ** i) for i, (n, d) in enumerate(_grid())]
    save_cached_calibration(prepared.directory, _payload(law, points))
    plan = _plan(cache)
    p = plan.prediction
    assert p.calibrated and p.basis == "calibrated" and p.law == "pydoc-fit"
    low, high = p.loss_band
    assert low < p.loss < high and high - low < 2.0  # the fit's band, not the published laws' spread
    assert any(r.startswith("Loss law calibrated on this data (6 runs") for r in plan.reasons)
    assert any(r.startswith("Calibrated band") for r in plan.reasons)


def test_the_tiny_builtin_plan_presents_no_figure_above_ln_v(tmp_path):
    from oneday.planner.explain import summary_lines

    plan = _plan(tmp_path / "cache")
    p = plan.prediction
    ln_v = math.log(plan.data.vocab_size)
    assert p.law_loss > ln_v  # the published law at this scale: far above a uniform guess
    assert p.basis == "bound" and p.loss <= ln_v and not p.calibrated
    low, high = p.loss_band
    assert 0 < low < high == p.loss <= ln_v
    text = " ".join(f"{k} {v}" for k, v in summary_lines(plan))
    assert f"below {p.loss:.3f}" in text and "not calibrated" in text
    assert any(r.startswith("Uncalibrated: the published law predicts") for r in plan.reasons)
    assert "not a prediction at this scale" in plan.reasons[0] and "predicted loss" not in plan.reasons[0]


def test_the_planned_vs_achieved_table_shows_a_bound_as_a_bound(tmp_path):
    from oneday.runner.summary import load_summary
    from tests.test_tracking import _summary

    bound = _summary(predicted_loss=6.405, predicted_loss_band=(1.69, 6.405), predicted_basis="bound")
    assert bound.predicted_loss_text() == "< 6.405 (1.690–6.405)"
    assert _summary().predicted_loss_text() == "5.000 (4.800–5.300)"
    (tmp_path / "summary.json").write_text(bound.to_json())
    assert load_summary(tmp_path).predicted_basis == "bound"


def test_calibration_runs_are_the_plans_recipe_at_smaller_sizes(prepared):
    from oneday.planner.decide import batch_and_lr
    from oneday.studies.calibrate import recipe_runs

    plan = tiny_plan(prepared, d_model=64, n_head=4, budget_seconds=3600.0)
    runs = recipe_runs(plan, [16, 32])
    assert [r.model.d_model for r in runs] == [16, 16, 32, 32]
    for r in runs:
        # the run's own parametrization (not a μP proxy), and the planner's batch and LR rule for its N and D
        assert r.model.parametrization == plan.model.parametrization
        assert (r.model.n_layer, r.model.head_dim, r.model.seq_len) == (
            plan.model.n_layer, plan.model.head_dim, plan.model.seq_len)
        assert r.recipe == batch_and_lr(spec=r.model, tokens=float(r.tokens), max_micro_batch=plan.train.micro_batch)
        train = r.params().apply(plan.train)
        assert (train.lr, train.beta2, train.warmup_fraction) == (r.recipe.lr, r.recipe.beta2,
                                                                  r.recipe.warmup_fraction)
        assert train.cooldown_shape == plan.train.cooldown_shape
    assert runs[1].tokens >= 3.9 * runs[0].tokens


def test_calibration_widths_are_narrower_than_the_plan_down_to_one_head(prepared):
    from dataclasses import replace

    from oneday.studies.calibrate import _model, calibration_widths

    plan = tiny_plan(prepared, d_model=64, n_head=4, budget_seconds=3600.0)

    def widths(d_model: int, n_head: int) -> list[int]:
        return calibration_widths(replace(plan, model=replace(plan.model, d_model=d_model, n_head=n_head)))

    assert widths(1024, 16) == [16, 32, 64, 128, 256, 512]  # a GPU plan: halvings, all multiples of its head 64
    assert widths(192, 3) == [24, 48, 64]  # 96 is not a multiple of 64: the head size below it
    assert widths(64, 1) == [16, 32]  # the CPU's smallest plans: one head as wide as the model below 64
    assert widths(48, 1) == [16, 24, 32]  # halving gives 24 alone: 16 and three quarters of the width join it
    assert widths(32, 1) == [16, 24]
    assert widths(24, 1) == [16]  # too narrow to calibrate (refused below)
    cpu = replace(plan, model=replace(plan.model, d_model=192, n_head=3))
    assert [(m.d_model, m.n_head, m.head_dim) for m in (_model(cpu, 64), _model(cpu, 48))] == [(64, 1, 64),
                                                                                              (48, 1, 48)]


# --- `oneday plan` calibrating on its own ------------------------------------------------------------------
def _simulated_cpu_plan(monkeypatch, hours: float, calls: list):
    from types import SimpleNamespace

    import oneday.planner.make as make
    import oneday.studies.calibrate as calibrate
    from oneday.planner.calibration import CachedCalibration
    from tests.simulated_device import SimulatedCpu
    from tests.test_make_plan import _simulate

    cpu = SimulatedCpu(tokens_per_s=lambda spec: 3e9 / spec.flops_per_token())
    _simulate(monkeypatch, cpu, name="cpu", train_tokens=10**9)
    monkeypatch.setattr(make, "AUTO_CALIBRATION_MIN_SECONDS", 3600.0)
    law = _truth().calibrated(E=2.0, A=20.0, B=150.0, source="synthetic")
    points = tuple((n, d, law.loss(n, d) + 0.01 * (-1) ** i) for i, (n, d) in enumerate(_grid()))
    kept: list = []

    def fake_calibrate(path, *, hours, out, clock, track):  # the runs, simulated: 100 s on the clock
        calls.append((hours, track))
        cpu.clock.advance(100.0)
        kept.append(CachedCalibration(law=law, points=points, path=Path("/nonexistent/calibration.json")))
        return SimpleNamespace(runs=(0,) * 6, seconds=100.0)

    monkeypatch.setattr(calibrate, "calibrate_plan", fake_calibrate)
    monkeypatch.setattr(make, "cached_calibration", lambda directory: kept[-1] if kept else None)
    return make.make_plan(hours=hours, data="simulated", vocab_size=8192, device="cpu", clock=cpu.clock)


def test_a_long_plan_calibrates_on_its_own_within_5_percent(monkeypatch):
    calls: list = []
    plan = _simulated_cpu_plan(monkeypatch, 2.0, calls)  # at 1 h the CPU's probe (136 s) leaves too little of 5%
    assert len(calls) == 1 and calls[0][1] is False  # once, and nothing logged to an MLflow store nobody named
    spent = plan.provenance.calibration_seconds
    assert calls[0][0] * 3600 <= 0.05 * 7200 and 100.0 < spent <= 0.05 * 7200
    assert plan.budget_seconds() == pytest.approx(7200.0, abs=1.0)  # the calibration counted against the budget
    p = plan.prediction
    assert p.calibrated and p.basis == "calibrated" and p.loss_band[0] < p.loss < p.loss_band[1]
    assert any(r.startswith("Calibrated on its own: 6 runs") for r in plan.reasons)
    assert plan.name.startswith("simulated-2h-")


def test_a_plan_whose_share_cannot_pay_for_calibrating_says_what_would(monkeypatch):
    """A 1 h CPU plan: 5% less the probe leaves 95 s, the smallest calibration needs ~700 s. The reason gives the
    cost and the one command that pays it once (the error's own "give more --hours" means another flag here)."""
    from oneday.planner import make
    from oneday.studies import calibrate
    from oneday.studies.calibrate import CalibrationBudgetError

    calls: list = []
    first = _simulated_cpu_plan(monkeypatch, 0.5, calls)  # uncalibrated: the plan `oneday plan` made first

    def too_small(path, *, hours, out, clock, track):
        raise CalibrationBudgetError("calibration budget too small", need_seconds=700.0)

    monkeypatch.setattr(calibrate, "calibrate_plan", too_small)
    again = make._self_calibrated(first, budget_seconds=3600.0, again={}, clock=lambda: 0.0)
    note = again.reasons[-1]
    assert note.startswith("Not calibrated: 5% of the budget less the probe leaves")
    assert "needs ~700 s (19% of the budget)" in note
    assert "`oneday tune plan.json --calibrate --hours 0.25`" in note  # 700 s + 10% in steps of 0.05 h
    assert again.reasons[:-1] == first.reasons and not again.prediction.calibrated


def test_a_short_plan_does_not_calibrate(monkeypatch):
    calls: list = []
    plan = _simulated_cpu_plan(monkeypatch, 0.5, calls)
    assert calls == [] and plan.provenance.calibration_seconds == 0.0 and not plan.prediction.calibrated
    hour = _simulated_cpu_plan(monkeypatch, 1.0, calls)  # long enough, but 5% less the probe buys too little
    assert calls == [] and any(r.startswith("Not calibrated: 5% of the budget") for r in hour.reasons)
