import numpy as np
import pytest

from lodestar.orchestrator.algorithms.weights import (
    effective_sample_size,
    logit,
    multinomial_resample,
    normalized_entropy,
    residual_resample,
    softmax,
    systematic_resample,
)


def test_logit_is_clipped_and_finite():
    w = logit([0.0, 0.5, 1.0])
    assert np.all(np.isfinite(w))
    assert w[1] == 0.0
    assert w[0] == pytest.approx(-w[2])


def test_softmax_temperature_flattens():
    w = np.array([0.0, 1.0, 3.0])
    sharp, flat = softmax(w, 0.5), softmax(w, 4.0)
    assert sharp.sum() == pytest.approx(1.0) and flat.sum() == pytest.approx(1.0)
    assert normalized_entropy(flat) > normalized_entropy(sharp)


def test_softmax_ignores_minus_infinity_entries():
    p = softmax([0.0, -np.inf, 0.0])
    assert p.tolist() == [0.5, 0.0, 0.5]


def test_ess_and_entropy_extremes():
    uniform = np.full(8, 1 / 8)
    assert effective_sample_size(uniform) == pytest.approx(8)
    assert normalized_entropy(uniform) == pytest.approx(1.0)
    one = np.array([1.0, 0, 0, 0])
    assert effective_sample_size(one) == pytest.approx(1)
    assert normalized_entropy(one) == pytest.approx(0.0)


@pytest.mark.parametrize("resample", [multinomial_resample, systematic_resample, residual_resample])
def test_resamplers_return_n_valid_sorted_indices(resample):
    p = softmax(np.array([0.1, 2.0, -1.0, 0.5, 0.0]))
    rng = np.random.default_rng(0)
    for _ in range(50):
        idx = resample(p, 7, rng)
        assert len(idx) == 7
        assert idx.min() >= 0 and idx.max() < 5
        assert list(idx) == sorted(idx)


def test_zero_weight_particles_are_never_drawn():
    p = np.array([0.5, 0.0, 0.5])
    rng = np.random.default_rng(1)
    for resample in (multinomial_resample, systematic_resample, residual_resample):
        for _ in range(200):
            assert 1 not in resample(p, 4, rng)
