"""Particle weights and resampling as pure functions on arrays (no model, no state)."""

from __future__ import annotations

import numpy as np

SCORE_EPS = 1e-7


def logit(scores: np.ndarray | list[float]) -> np.ndarray:
    """log(s / (1 - s)) with s clipped to [eps, 1 - eps] so a perfect score stays finite."""
    s = np.clip(np.asarray(scores, dtype=np.float64), SCORE_EPS, 1.0 - SCORE_EPS)
    return np.log(s) - np.log1p(-s)


def softmax(log_weights: np.ndarray | list[float], temperature: float = 1.0) -> np.ndarray:
    w = np.asarray(log_weights, dtype=np.float64) / temperature
    finite = np.isfinite(w)
    if not finite.any():
        raise ValueError("softmax of weights that are all -inf")
    z = np.where(finite, w - w[finite].max(), -np.inf)
    e = np.exp(z)
    return e / e.sum()


def effective_sample_size(p: np.ndarray) -> float:
    """1 / sum(p_i^2): N for uniform weights, 1 when one particle holds all the mass."""
    return float(1.0 / np.sum(np.square(p)))


def normalized_entropy(p: np.ndarray) -> float:
    """-sum(p log p) / log N in [0, 1]; 1 for uniform weights (defined as 1 when N == 1)."""
    n = len(p)
    if n <= 1:
        return 1.0
    nz = p[p > 0]
    return float(-np.sum(nz * np.log(nz)) / np.log(n))


def multinomial_resample(p: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n ancestor indices drawn i.i.d. from p, sorted so that copies of one parent sit together."""
    return np.sort(rng.choice(len(p), size=n, replace=True, p=p))


def systematic_resample(p: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """One uniform offset, n evenly spaced pointers: the lowest-variance standard scheme."""
    positions = (rng.random() + np.arange(n)) / n
    cumulative = np.cumsum(p)
    cumulative[-1] = 1.0
    return np.searchsorted(cumulative, positions, side="right").astype(np.int64)


def residual_resample(p: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """floor(n p_i) copies of each particle; the remainder drawn multinomially from residuals."""
    counts = np.floor(n * p).astype(np.int64)
    rest = n - int(counts.sum())
    if rest > 0:
        residual = n * p - counts
        residual /= residual.sum()
        counts += np.bincount(rng.choice(len(p), size=rest, p=residual), minlength=len(p))
    return np.repeat(np.arange(len(p)), counts)


RESAMPLERS = {
    "multinomial": multinomial_resample,
    "systematic": systematic_resample,
    "residual": residual_resample,
}
