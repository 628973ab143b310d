"""The vectorised bootstrap statistics give rliable's numbers: the same point estimates exactly,
and 95% intervals within the spread of two bootstraps of 10,000 resamples."""

from __future__ import annotations

import numpy as np
import pytest
from rliable import library as rly
from rliable import metrics

from cfc_rl.experiment import statistics


@pytest.fixture
def scores() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "x": rng.normal(1.0, 1.0, size=(5, 3)) + np.array([0.0, 2.0, -1.0]),
        "y": rng.normal(0.5, 1.5, size=(4, 3)) + np.array([0.0, 2.0, -1.0]),
        "z": np.round(rng.normal(0.0, 1.0, size=(5, 3))),  # ties between runs
    }


def rliable_intervals(data, function, reps=10_000):
    state = np.random.get_state()
    np.random.seed(1)
    try:
        return rly.get_interval_estimates(data, function, reps=reps)
    finally:
        np.random.set_state(state)


def test_iqm_and_mean_match_rliable(scores) -> None:
    def iqm_and_mean(x):
        return np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x)])

    points, intervals = rliable_intervals({"x": scores["x"]}, iqm_and_mean)
    (iqm, iqm_low, iqm_high), (mean, mean_low, mean_high) = statistics.iqm_and_mean_intervals(
        scores["x"]
    )
    assert iqm == pytest.approx(points["x"][0], abs=1e-12)
    assert mean == pytest.approx(points["x"][1], abs=1e-12)
    width = iqm_high - iqm_low
    assert [iqm_low, iqm_high] == pytest.approx(list(intervals["x"][:, 0]), abs=0.05 * width)
    assert [mean_low, mean_high] == pytest.approx(list(intervals["x"][:, 1]), abs=0.05 * width)
    assert iqm_low < iqm < iqm_high and mean_low < mean < mean_high


@pytest.mark.parametrize(("x", "y"), [("x", "y"), ("z", "x"), ("z", "z")])
def test_probability_of_improvement_matches_rliable(scores, x: str, y: str) -> None:
    pair = (scores[x], scores[y])
    points, intervals = rliable_intervals({"p": pair}, metrics.probability_of_improvement, 2_000)
    p, low, high = statistics.probability_of_improvement_interval(*pair)
    assert p == pytest.approx(float(points["p"]), abs=1e-12)
    assert [low, high] == pytest.approx(list(np.ravel(intervals["p"])), abs=0.03)
    if x == y:
        assert p == 0.5  # a policy against itself: every comparison a tie or a mirror


def test_curve_intervals_bound_the_iqm_at_each_point() -> None:
    rng = np.random.default_rng(0)
    scores = np.cumsum(rng.normal(1.0, 1.0, size=(5, 12)), axis=1)
    point, low, high = statistics.curve_intervals(scores)
    for i in range(scores.shape[1]):
        assert point[i] == pytest.approx(metrics.aggregate_iqm(scores[:, [i]]))
    assert np.all(low <= point) and np.all(point <= high) and np.all(low < high)
    # the same input gives the same bands (a seeded generator)
    assert np.array_equal(statistics.curve_intervals(scores)[1], low)


def test_a_single_run_has_a_point_interval() -> None:
    (iqm, low, high), (mean, mean_low, mean_high) = statistics.iqm_and_mean_intervals(
        np.array([[3.0, 5.0]])
    )
    assert iqm == mean == 4.0 and low == high == mean_low == mean_high == 4.0
