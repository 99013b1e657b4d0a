"""Bootstrap intervals: seeded, resampling clusters, and covering a known value at about the stated rate."""

from __future__ import annotations

import math

import numpy as np
import pytest

from personavec.stats import auroc, bootstrap, mean_interval


def _clustered(rng: np.random.Generator, n_clusters: int = 20, per: int = 3, spread: float = 1.0):
    """Rows whose true mean is 0: a cluster effect shared by a question's answers, plus noise."""
    effect = rng.normal(0, spread, n_clusters)
    values = np.concatenate([effect[c] + rng.normal(0, 1, per) for c in range(n_clusters)])
    return values, np.repeat(np.arange(n_clusters), per)


def test_an_interval_is_reproducible_and_depends_on_its_seed():
    values, clusters = _clustered(np.random.default_rng(0))
    a, b = mean_interval(values, clusters, seed=3), mean_interval(values, clusters, seed=3)
    assert a == b and a[0] < values.mean() < a[1]
    assert mean_interval(values, clusters, seed=4) != a


def test_the_interval_of_a_mean_covers_the_true_mean_at_about_95_percent():
    rng = np.random.default_rng(1)
    hits = []
    for k in range(200):
        values, clusters = _clustered(rng)
        lo, hi = mean_interval(values, clusters, seed=k, n_boot=400)
        hits.append(lo <= 0.0 <= hi)
    # 0.94 here (seeded, so exact); resampling rows instead of questions gives 0.87 on the same data
    assert 0.90 <= np.mean(hits) <= 0.985, np.mean(hits)


def test_clusters_are_resampled_whole_so_shared_effects_widen_the_interval():
    values, clusters = _clustered(np.random.default_rng(2), spread=2.0)
    by_question = mean_interval(values, clusters)
    by_row = mean_interval(values, np.arange(len(values)))
    assert by_question[1] - by_question[0] > 1.5 * (by_row[1] - by_row[0])


def test_a_statistic_of_two_groups_resamples_their_questions():
    import torch

    rng = np.random.default_rng(5)
    pos, neg = rng.normal(1, 1, 40), rng.normal(0, 1, 40)
    score = np.concatenate([pos, neg])
    is_pos = np.r_[np.ones(40, bool), np.zeros(40, bool)]
    question = np.r_[np.arange(40) % 20, np.arange(40) % 20]

    def stat(idx: np.ndarray) -> float:
        return auroc(torch.tensor(score[idx][is_pos[idx]]), torch.tensor(score[idx][~is_pos[idx]]))

    lo, hi = bootstrap(stat, question)
    point = stat(np.arange(80))
    assert lo < point < hi and 0.5 < point < 1.0


@pytest.mark.parametrize("clusters", [[], [7, 7, 7]])
def test_fewer_than_two_clusters_give_no_interval(clusters):
    lo, hi = mean_interval([1.0] * len(clusters), clusters)
    assert math.isnan(lo) and math.isnan(hi)


def test_a_correlation_interval_holds_its_estimate_and_narrows_with_more_questions():
    from personavec.stats import pearson, pearson_interval

    rng = np.random.default_rng(3)
    widths = []
    for n in (20, 200):
        x = rng.normal(0, 1, n)
        y = 0.6 * x + rng.normal(0, 0.8, n)
        lo, hi = pearson_interval(x, y, np.arange(n))
        assert lo < pearson(x.tolist(), y.tolist()) < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2


def test_finite_or_none_keeps_finite_numbers_only():
    from personavec.stats import finite_or_none

    assert [finite_or_none(x) for x in (1, 2.5, np.float32(0.5), "3", float("nan"), float("inf"), None, "x")] == \
        [1.0, 2.5, 0.5, 3.0, None, None, None, None]
