"""Scaling rules: the numbers the design quotes, reproduced from the formulas."""

from __future__ import annotations

import dataclasses
import math

import pytest

from oneday.errors import UserError
from oneday.planner.laws import (
    EPOCH_2024,
    HOFFMANN_2022,
    MUENNIGHOFF_MIN_UNIQUE_TOKENS,
    MUENNIGHOFF_R_STAR,
    MUENNIGHOFF_R_STAR_PARAMS,
    NEGLIGIBLE_REPETITION_EPOCHS,
    VANISHING_RETURN_EPOCHS,
    LossLaw,
    data_constrained_loss,
    deepseek_batch_tokens,
    deepseek_lr,
    effective_params,
    effective_tokens,
    epochs,
    fit_law_eab,
    lr_horizon_correction,
    supported_params,
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


@pytest.mark.parametrize("law", [EPOCH_2024, HOFFMANN_2022], ids=lambda law: law.name)
def test_data_optimal_params_inverts_compute_optimal(law: LossLaw) -> None:
    for c in (1e15, 1e18, 1e21):
        n, d = law.compute_optimal(c)
        assert law.data_optimal_params(d) == pytest.approx(n, rel=1e-9)
    with pytest.raises(ValueError):
        law.data_optimal_params(0.0)


def test_a_calibration_with_a_zero_term_still_plans() -> None:
    """bench/predictions.py: a calibration on ../shared/data fitted A = 0 (four runs of 16 and 32 wide: size
    bought nothing at 3 CPU minutes), and the next `oneday plan` died dividing by zero in `compute_optimal`."""
    no_size = EPOCH_2024.calibrated(E=5.08, A=0.0, B=96.3, source="fit")
    no_data = EPOCH_2024.calibrated(E=5.08, A=50.0, B=0.0, source="fit")
    assert no_size.compute_optimal(6e12) == (1.0, 1e12)  # every token to the smallest model
    assert no_data.compute_optimal(6e12) == (1e12, 1.0)
    for law in (no_size, no_data):
        assert law.data_optimal_params(1e6) == math.inf  # no size is in excess
        assert effective_params(1e6, 1e5, law=law) == 1e6
        assert math.isfinite(data_constrained_loss(law, params=1e6, tokens=1e7, unique_tokens=1e5))
    small, large = (no_size.loss(n, 1e6) for n in (1e5, 1e7))
    assert small == large  # A = 0: the shapes differ only by the tokens they train


def test_data_optimal_params_of_the_default_law() -> None:
    # U_N of Muennighoff et al. 2023: about D/30 at 100M tokens, D/24 at 10B under the default law
    assert EPOCH_2024.data_optimal_params(1e8) == pytest.approx(1e8 / 30, rel=0.01)
    assert EPOCH_2024.data_optimal_params(1e10) == pytest.approx(1e10 / 23.7, rel=0.01)


def test_effective_params_values() -> None:
    unique = 1e9
    u_n = EPOCH_2024.data_optimal_params(unique)
    # a model the data supports is worth what it is, exactly
    for n in (1e6, 0.5 * u_n, u_n):
        assert effective_params(n, unique, law=EPOCH_2024) == n
    assert effective_params(3e9, 1e13, law=EPOCH_2024) == 3e9
    # R_N = R*_N excess parameters are worth 1 + R*_N·(1 − 1/e) times U_N (eq. 5)
    n = u_n * (1 + MUENNIGHOFF_R_STAR_PARAMS)
    assert effective_params(n, unique, law=EPOCH_2024) / u_n == pytest.approx(1 + 5.309 * (1 - math.exp(-1)))
    # saturation: never more than U_N·(1 + R*_N)
    assert effective_params(1e15, unique, law=EPOCH_2024) <= u_n * (1 + MUENNIGHOFF_R_STAR_PARAMS)
    assert effective_params(1e15, unique, law=EPOCH_2024) == pytest.approx(u_n * (1 + 5.309))


def test_effective_params_monotone() -> None:
    unique = 1e8
    values = [effective_params(n, unique, law=EPOCH_2024) for n in (1e6, 3e6, 1e7, 1e8, 1e9, 1e10)]
    assert values == sorted(values)
    # less unique data never makes a parameter worth more
    worth = [effective_params(5e8, u, law=EPOCH_2024) for u in (1e11, 1e10, 1e9, 1e8, 1e7)]
    assert worth == sorted(worth, reverse=True)


def test_data_constrained_loss_reproduces_muennighoff_fit() -> None:
    # The paper's own C4 fit and its figure 1 (right) pair, as published with the paper's code
    # (huggingface/datablations README, "Parametric Fit"): 6.34B parameters on 242B tokens of 25B unique
    # predict 2.22564, better than 8.67B on 178B (2.22696); both repeat data and exceed U_N.
    fit = LossLaw(
        E=math.exp(0.6254804),
        A=math.exp(6.255414),
        B=math.exp(7.3049974),
        alpha=0.3526596,
        beta=0.3526596,
        name="muennighoff-2023-c4",
        source="Muennighoff et al. 2023",
    )
    smaller = data_constrained_loss(fit, params=6.34e9, tokens=242e9, unique_tokens=25e9)
    larger = data_constrained_loss(fit, params=8.67e9, tokens=178e9, unique_tokens=25e9)
    assert smaller == pytest.approx(2.2256440889984477, abs=1e-5)
    assert larger == pytest.approx(2.2269634075087867, abs=1e-5)
    assert smaller < larger
    # with fresh data and a model the data supports, it is the plain law
    assert data_constrained_loss(EPOCH_2024, params=1e8, tokens=2e9, unique_tokens=1e11) == EPOCH_2024.loss(1e8, 2e9)


def test_epoch_thresholds_follow_the_fit() -> None:
    unique = 1e9
    # up to 4 epochs repeated tokens are worth ≥ 93% of fresh ones
    worth = effective_tokens(NEGLIGIBLE_REPETITION_EPOCHS * unique, unique) / (NEGLIGIBLE_REPETITION_EPOCHS * unique)
    assert worth >= 0.93

    # at 16 epochs one more pass is worth e^(−15/R*) ≈ 38% of fresh data, and it keeps falling
    def marginal(ep: float) -> float:
        h = 1e-3 * unique
        return (effective_tokens(ep * unique + h, unique) - effective_tokens(ep * unique, unique)) / h

    assert marginal(VANISHING_RETURN_EPOCHS) == pytest.approx(math.exp(-15 / MUENNIGHOFF_R_STAR), rel=1e-3)
    assert marginal(VANISHING_RETURN_EPOCHS) < 0.4 and marginal(40) < 0.1


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


def test_supported_params_is_bounded_to_the_fitted_range() -> None:
    # from 100M unique tokens up: the paper's U_N; below: the 100M-token U_N, never the extrapolation to nothing
    for u in (1e8, 1e9, 1e11):
        assert supported_params(u, law=EPOCH_2024) == EPOCH_2024.data_optimal_params(u)
    floor = EPOCH_2024.data_optimal_params(MUENNIGHOFF_MIN_UNIQUE_TOKENS)
    for u in (1e3, 1e6, 5e7):
        assert supported_params(u, law=EPOCH_2024) == floor
    # a 2×64-sized model on a 1M-token corpus is worth what it is; the unbounded U_N (~26k) would discount it
    assert EPOCH_2024.data_optimal_params(1e6) < 1e5
    assert effective_params(4e5, 1e6, law=EPOCH_2024) == 4e5
    assert data_constrained_loss(EPOCH_2024, params=4e5, tokens=3e7, unique_tokens=1e6) == EPOCH_2024.loss(
        4e5, effective_tokens(3e7, 1e6)
    )


def test_unigram_entropy() -> None:
    from oneday.planner.laws import unigram_entropy

    assert unigram_entropy([5, 5, 5, 5]) == pytest.approx(math.log(4))
    assert unigram_entropy([7, 0, 0]) == 0.0
    assert unigram_entropy([1, 3]) == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    with pytest.raises(ValueError):
        unigram_entropy([0, 0])
