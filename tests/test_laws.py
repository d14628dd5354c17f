"""Scaling rules: the numbers the design quotes, reproduced from the formulas."""

from __future__ import annotations

import dataclasses
import math

import pytest

from oneday.errors import UserError
from oneday.planner.laws import (
    EPOCH_2024,
    HOFFMANN_2022,
    LossLaw,
    deepseek_batch_tokens,
    deepseek_lr,
    effective_tokens,
    epochs,
    fit_law_eab,
    lr_horizon_correction,
)


@pytest.mark.parametrize("law", [EPOCH_2024, HOFFMANN_2022], ids=lambda law: law.name)
def test_compute_optimal_at_1e18_matches_design(law: LossLaw) -> None:
    # At 1e18 FLOPs both fits give N ≈ 8.0e7, D ≈ 2.07e9 (docs/design.md, Planning rules).
    n, d = law.compute_optimal(1e18)
    assert n == pytest.approx(8.0e7, rel=0.01)
    assert d == pytest.approx(2.07e9, rel=0.01)
    assert 6 * n * d == pytest.approx(1e18, rel=1e-12)


def test_epoch_tokens_per_param_at_1e20() -> None:
    n, d = EPOCH_2024.compute_optimal(1e20)
    assert d / n == pytest.approx(22.9, rel=0.01)


def test_compute_optimal_is_the_minimum_on_the_isoflop_curve() -> None:
    c = 1e19
    for law in (EPOCH_2024, HOFFMANN_2022):
        n_opt, d_opt = law.compute_optimal(c)
        best = law.loss(n_opt, d_opt)
        for factor in (0.8, 0.9, 1.1, 1.25):
            n = n_opt * factor
            assert law.loss(n, c / (6 * n)) > best


def test_loss_formula() -> None:
    law = LossLaw(E=1.0, A=2.0, B=3.0, alpha=0.5, beta=0.5, name="t", source="t")
    assert law.loss(4.0, 9.0) == pytest.approx(1.0 + 2.0 / 2.0 + 3.0 / 3.0)
    with pytest.raises(ValueError):
        law.loss(0.0, 1.0)


def test_deepseek_reference_values() -> None:
    assert deepseek_lr(1e18) == pytest.approx(1.75e-3, rel=0.01)
    assert deepseek_batch_tokens(1e18) == pytest.approx(2.26e5, rel=0.01)


def test_horizon_correction() -> None:
    assert lr_horizon_correction(1e9, 1e9) == 1.0
    assert lr_horizon_correction(1e9, 2e9) == pytest.approx(2**-0.32)
    assert lr_horizon_correction(2e9, 1e9) > 1.0


def test_muennighoff_values() -> None:
    unique = 1e9
    assert effective_tokens(4e9, unique) / 4e9 == pytest.approx(0.93, abs=0.005)
    assert effective_tokens(16e9, unique) / 16e9 == pytest.approx(0.66, abs=0.005)
    # no repetition: worth what it is
    assert effective_tokens(5e8, unique) == 5e8
    assert effective_tokens(1e9, unique) == 1e9
    # saturation: never more than U·(1 + R*)
    assert effective_tokens(1e11, unique) < unique * (1 + 15.39)
    assert effective_tokens(1e14, unique) <= unique * (1 + 15.39)
    assert epochs(3e9, unique) == 3.0


def test_effective_tokens_monotone() -> None:
    unique = 1e8
    values = [effective_tokens(t, unique) for t in (1e7, 1e8, 2e8, 8e8, 3e9, 1e10)]
    assert values == sorted(values)
    # less unique data never makes a trained token worth more
    ratios = [effective_tokens(1e9, u) / 1e9 for u in (1e9, 5e8, 1e8, 5e7, 1e7)]
    assert ratios == sorted(ratios, reverse=True)


def test_fit_law_eab_recovers_coefficients() -> None:
    truth = dataclasses.replace(EPOCH_2024, E=2.1, A=300.0, B=900.0)
    points = [(n, d, truth.loss(n, d)) for n in (2e6, 8e6, 3e7) for d in (5e7, 2e8, 1e9)]
    fitted = fit_law_eab(points, alpha=truth.alpha, beta=truth.beta)
    e, a, b = fitted.E, fitted.A, fitted.B
    assert e == pytest.approx(2.1, rel=1e-6)
    assert a == pytest.approx(300.0, rel=1e-6)
    assert b == pytest.approx(900.0, rel=1e-6)
    assert (fitted.alpha, fitted.beta) == (truth.alpha, truth.beta)
    assert "least squares" in fitted.source


def test_fit_law_eab_with_noise_and_nonnegativity() -> None:
    truth = dataclasses.replace(HOFFMANN_2022, E=1.9, A=250.0, B=600.0)
    noise = [0.01, -0.008, 0.004, -0.012, 0.006, 0.0, -0.003, 0.009, -0.005]
    grid = [(n, d) for n in (3e6, 1e7, 4e7) for d in (1e8, 4e8, 2e9)]
    points = [(n, d, truth.loss(n, d) + e) for (n, d), e in zip(grid, noise, strict=True)]
    fitted = fit_law_eab(points, alpha=truth.alpha, beta=truth.beta, base=HOFFMANN_2022)
    e = fitted.E
    assert e == pytest.approx(1.9, abs=0.1)
    for n, d in grid:
        assert fitted.loss(n, d) == pytest.approx(truth.loss(n, d), abs=0.02)
    # data where loss rises with N: the unconstrained fit would give A < 0; NNLS clamps it to 0
    rising = [(n, d, 3.0 + 1e-9 * n + 100.0 / d**0.3658) for n in (1e6, 1e7, 1e8) for d in (1e8, 1e9)]
    clamped = fit_law_eab(rising, alpha=0.3478, beta=0.3658)
    assert clamped.A == 0.0
    assert clamped.E >= 0 and clamped.B >= 0


def test_fit_law_eab_needs_three_points() -> None:
    with pytest.raises(UserError, match="at least 3"):
        fit_law_eab([(1e6, 1e8, 3.0), (1e7, 1e8, 2.9)], alpha=0.35, beta=0.37)


def test_calibrated_replaces_eab_only() -> None:
    law = EPOCH_2024.calibrated(E=2.5, A=100.0, B=200.0, source="my runs")
    assert (law.alpha, law.beta) == (EPOCH_2024.alpha, EPOCH_2024.beta)
    assert law.E == 2.5 and law.source == "my runs" and law.name.endswith("calibrated")
    assert math.isclose(law.loss(1.0, 1.0), 302.5)
