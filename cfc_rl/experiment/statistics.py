"""The statistics of the summaries: interquartile mean, probability of improvement and their 95%
stratified-bootstrap intervals, as rliable defines them (Agarwal et al. 2021), vectorised.

rliable calls a statistic once per bootstrap resample, through scipy's per-call checks: about
4 s per table cell at 10,000 resamples, and minutes for a benchmark's learning curves. Here all
resamples are drawn at once, as an index array of shape (resamples, runs, tasks), and each
statistic is computed over the resample axis in one call. The statistics are rliable's
definitions (the IQM is scipy's 25% trimmed mean over all scores, as in ``rliable.metrics``) and
the intervals the same percentile bootstrap (resampling the runs of each task separately);
``tests/test_experiment_statistics.py`` holds them to rliable's own numbers.

Scores are arrays of shape (runs, tasks). The resamples come from a generator seeded with 0, so
a report made twice from the same runs is the same, byte for byte.
"""

from __future__ import annotations

import numpy as np
from scipy import stats as scipy_stats

__all__ = [
    "BOOTSTRAP_REPS",
    "curve_intervals",
    "iqm",
    "iqm_and_mean_intervals",
    "probability_of_improvement",
    "probability_of_improvement_interval",
    "stratified_bootstrap",
]

BOOTSTRAP_REPS = 10_000
CONFIDENCE = 0.95


def iqm(scores: np.ndarray) -> float:
    """The interquartile mean of all the scores (rliable's ``aggregate_iqm``)."""
    return float(scipy_stats.trim_mean(np.asarray(scores, dtype=float), 0.25, axis=None))


def probability_of_improvement(x: np.ndarray, y: np.ndarray) -> float:
    """The probability that a run of X scores above a run of Y on a task drawn at random (ties
    count half): the mean over tasks of Mann-Whitney's U / (n m) (rliable's
    ``probability_of_improvement``).

    :param x: scores of X, (runs of X, tasks)
    :param y: scores of Y on the same tasks, (runs of Y, tasks)
    """
    return float(
        _improvement(np.asarray(x, dtype=float)[None], np.asarray(y, dtype=float)[None])[0]
    )


def stratified_bootstrap(
    scores: np.ndarray, reps: int = BOOTSTRAP_REPS, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Resamples of the runs of each task, drawn separately per task: (reps, runs, tasks)."""
    scores = np.asarray(scores, dtype=float)
    runs, tasks = scores.shape
    rng = rng if rng is not None else np.random.default_rng(0)
    index = rng.integers(0, runs, size=(reps, runs, tasks))
    return scores[index, np.arange(tasks)]


def _bounds(estimates: np.ndarray) -> np.ndarray:
    """The 95% percentile interval of bootstrap estimates along their first axis: (2, ...)."""
    tail = (1.0 - CONFIDENCE) / 2 * 100
    return np.percentile(estimates, [tail, 100.0 - tail], axis=0)


def _interval(estimates: np.ndarray) -> tuple[float, float]:
    low, high = _bounds(estimates)
    return float(low), float(high)


def iqm_and_mean_intervals(
    scores: np.ndarray, reps: int = BOOTSTRAP_REPS
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """The IQM and the mean of ``scores`` (runs, tasks), each with its 95% interval:
    ``((iqm, low, high), (mean, low, high))``."""
    scores = np.asarray(scores, dtype=float)
    samples = stratified_bootstrap(scores, reps).reshape(reps, -1)
    iqms = scipy_stats.trim_mean(samples, 0.25, axis=1)
    means = samples.mean(axis=1)
    return (iqm(scores), *_interval(iqms)), (float(scores.mean()), *_interval(means))


def probability_of_improvement_interval(
    x: np.ndarray, y: np.ndarray, reps: int = BOOTSTRAP_REPS
) -> tuple[float, float, float]:
    """:func:`probability_of_improvement` with its 95% interval: ``(p, low, high)``; the runs
    of X and of Y are resampled independently, each per task."""
    rng = np.random.default_rng(0)
    x_samples = stratified_bootstrap(x, reps, rng)
    y_samples = stratified_bootstrap(y, reps, rng)
    return (probability_of_improvement(x, y), *_interval(_improvement(x_samples, y_samples)))


def _improvement(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(reps, n, tasks) and (reps, m, tasks) -> (reps,) probabilities of improvement."""
    above = (x[:, :, None, :] > y[:, None, :, :]).mean(axis=(1, 2))
    equal = (x[:, :, None, :] == y[:, None, :, :]).mean(axis=(1, 2))
    return (above + 0.5 * equal).mean(axis=1)


def curve_intervals(
    scores: np.ndarray, reps: int = 1_000
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IQM over runs at each point of a learning curve, with 95% intervals.

    :param scores: (runs, points)
    :return: the IQM, the low and the high bound, each (points,)
    """
    scores = np.asarray(scores, dtype=float)
    # each point resampled on its own, as rliable does with points as tasks
    low, high = _bounds(scipy_stats.trim_mean(stratified_bootstrap(scores, reps), 0.25, axis=1))
    return scipy_stats.trim_mean(scores, 0.25, axis=0), low, high
