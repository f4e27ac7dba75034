"""Tests of tokmarg.metrics: expected values are hand-worked or computed by scikit-learn here."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, f1_score, hamming_loss, roc_auc_score

from tokmarg.metrics import (
    HEADLINE,
    binarize,
    bootstrap_headline,
    choose_k,
    compute_metrics,
    f1_threshold_curve,
    generalization_table,
    ranking_agreement,
    t_opti,
    threshold_transfer,
    weighted_micro_auc,
)

CODES = ["S1", "S2", "S3", "S4", "S5"]


@pytest.fixture
def random_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(42)
    n, k = 80, len(CODES)
    y_true = rng.random((n, k)) < 0.3
    y_true[:, 4] = False  # S5 has no positives: its ROC AUC is undefined
    y_score = np.clip(0.35 * y_true + 0.65 * rng.random((n, k)), 0.0, 1.0)
    return y_true, binarize(y_score, 0.5), y_score


def test_binarize_is_greater_or_equal() -> None:
    out = binarize(np.array([[0.49, 0.5, 0.51]]), 0.5)
    assert out.dtype == bool
    assert out.tolist() == [[False, True, True]]


def test_metrics_match_sklearn(random_case) -> None:
    y_true, y_pred, y_score = random_case
    m = compute_metrics(y_true, y_pred, y_score, codes=CODES, n_boot=50)
    assert m["n_samples"] == 80
    assert m["f1_micro"] == pytest.approx(f1_score(y_true, y_pred, average="micro", zero_division=0))
    assert m["f1_macro"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert m["hamming_loss"] == pytest.approx(hamming_loss(y_true, y_pred))
    assert m["roc_auc_micro"] == pytest.approx(roc_auc_score(y_true, y_score, average="micro"))
    assert m["pr_auc_micro"] == pytest.approx(average_precision_score(y_true, y_score, average="micro"))
    for j, code in enumerate(CODES):
        assert m[f"f1/{code}"] == pytest.approx(f1_score(y_true[:, j], y_pred[:, j], zero_division=0))
        if j < 4:
            assert m[f"roc_auc/{code}"] == pytest.approx(roc_auc_score(y_true[:, j], y_score[:, j]))
    assert math.isnan(m["roc_auc/S5"])
    assert not any(key.startswith("unsafe_") for key in m)


def test_no_warnings_leak(random_case) -> None:
    y_true, y_pred, y_score = random_case
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_metrics(np.zeros_like(y_true), y_pred, y_score, codes=CODES, n_boot=20)
        compute_metrics(y_true, np.zeros_like(y_pred), None, codes=CODES, n_boot=20)


def test_ece_and_brier_hand_case() -> None:
    # flattened (row-major) pairs: s = [0.05, 0.10, 0.50, 0.95, 1.00, 0.30], y = [0, 1, 1, 1, 0, 0]
    y_true = np.array([[0, 1], [1, 1], [0, 0]], dtype=bool)
    y_score = np.array([[0.05, 0.10], [0.50, 0.95], [1.00, 0.30]])
    m = compute_metrics(y_true, binarize(y_score, 0.5), y_score, codes=["A", "B"], n_boot=0)
    # 15 bins of width 1/15 = 0.0667:
    #   bin 0  [0, .0667)      : s .05       y 0    -> |.05 - 0|  = .05, weight 1/6
    #   bin 1  [.0667, .1333)  : s .10       y 1    -> |.10 - 1|  = .90, weight 1/6
    #   bin 4  [.2667, .3333)  : s .30       y 0    -> |.30 - 0|  = .30, weight 1/6
    #   bin 7  [.4667, .5333)  : s .50       y 1    -> |.50 - 1|  = .50, weight 1/6
    #   bin 14 [.9333, 1] (closed, holds 1.0): s .95, 1.0 (mean .975), y 1, 0 (mean .5) -> .475, weight 2/6
    # ECE = (.05 + .90 + .30 + .50 + 2 * .475) / 6 = 2.70 / 6 = 0.45
    assert m["ece"] == pytest.approx(0.45)
    # Brier = (.05^2 + .9^2 + .5^2 + .05^2 + 1^2 + .3^2) / 6 = (.0025 + .81 + .25 + .0025 + 1 + .09) / 6
    assert m["brier"] == pytest.approx(2.155 / 6)
    assert all(math.isnan(m[f"{h}_{e}"]) for h, _ in HEADLINE for e in ("lo", "hi"))  # n_boot=0


def test_no_scores_gives_nan_score_metrics(random_case) -> None:
    y_true, y_pred, _ = random_case
    m = compute_metrics(y_true, y_pred, None, codes=CODES, n_boot=50)
    for key in ("roc_auc_micro", "pr_auc_micro", "ece", "brier", "roc_auc_micro_lo", "roc_auc_micro_hi"):
        assert math.isnan(m[key]), key
    assert all(math.isnan(m[f"roc_auc/{c}"]) for c in CODES)
    assert m["f1_micro"] == pytest.approx(f1_score(y_true, y_pred, average="micro", zero_division=0))
    assert m["f1_micro_lo"] <= m["f1_micro"] <= m["f1_micro_hi"]


def test_roc_auc_nan_when_one_class(random_case) -> None:
    y_true, y_pred, y_score = random_case
    m = compute_metrics(np.zeros_like(y_true), y_pred, y_score, codes=CODES, n_boot=20)
    assert math.isnan(m["roc_auc_micro"]) and math.isnan(m["pr_auc_micro"])
    assert math.isnan(m["roc_auc_micro_lo"]) and math.isnan(m["roc_auc_micro_hi"])


def test_binary_view_hand_case() -> None:
    unsafe_true = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    unsafe_score = np.array([0.9, 0.6, 0.2, 0.7, 0.1, 0.4])
    y_true = np.array([[1, 0], [0, 1], [1, 1], [0, 0], [0, 0], [0, 0]], dtype=bool)
    y_pred = y_true.copy()
    m = compute_metrics(
        y_true, y_pred, None, codes=["A", "B"], unsafe_true=unsafe_true, unsafe_score=unsafe_score, n_boot=0
    )
    # pred = score >= .5 = [1, 1, 0, 1, 0, 0]: tp 2, fp 1, fn 1 -> F1 = 4 / (4 + 1 + 1) = 2/3
    assert m["unsafe_f1"] == pytest.approx(2 / 3)
    # safe rows 3, 4, 5 predicted [1, 0, 0] -> FPR 1/3
    assert m["unsafe_fpr"] == pytest.approx(1 / 3)
    # descending: .9 P, .7 N, .6 P, .4 N, .2 P, .1 N; AP = 1/3 * (1/1 + 2/3 + 3/5) = 34/45
    assert m["unsafe_pr_auc"] == pytest.approx(34 / 45)
    # unsafe_pred overrides the 0.5 threshold: [1, 0, 0, 0, 0, 0] -> tp 1, fn 2 -> F1 2/4; FPR 0
    m2 = compute_metrics(
        y_true,
        y_pred,
        None,
        codes=["A", "B"],
        unsafe_true=unsafe_true,
        unsafe_score=unsafe_score,
        unsafe_pred=np.array([1, 0, 0, 0, 0, 0]),
        n_boot=0,
    )
    assert m2["unsafe_f1"] == pytest.approx(0.5) and m2["unsafe_fpr"] == 0.0
    # no safe rows -> FPR undefined; no score -> PR AUC undefined
    m3 = compute_metrics(
        y_true[:3],
        y_pred[:3],
        None,
        codes=["A", "B"],
        unsafe_true=unsafe_true[:3],
        unsafe_pred=np.array([1, 1, 0]),
        n_boot=0,
    )
    assert math.isnan(m3["unsafe_fpr"]) and math.isnan(m3["unsafe_pr_auc"])
    assert m3["unsafe_f1"] == pytest.approx(0.8)  # tp 2, fn 1 -> 4 / 5


def test_bootstrap_brackets_and_deterministic(random_case) -> None:
    y_true, y_pred, y_score = random_case
    a = compute_metrics(y_true, y_pred, y_score, codes=CODES, n_boot=200, seed=7)
    b = compute_metrics(y_true, y_pred, y_score, codes=CODES, n_boot=200, seed=7)
    c = compute_metrics(y_true, y_pred, y_score, codes=CODES, n_boot=200, seed=8)
    for h, _ in HEADLINE:
        assert a[f"{h}_lo"] <= a[h] <= a[f"{h}_hi"]
        assert a[f"{h}_lo"] < a[f"{h}_hi"]
        assert (a[f"{h}_lo"], a[f"{h}_hi"]) == (b[f"{h}_lo"], b[f"{h}_hi"])
    assert (a["f1_micro_lo"], a["f1_micro_hi"]) != (c["f1_micro_lo"], c["f1_micro_hi"])


def test_bootstrap_matches_sklearn_on_explicit_resamples(random_case) -> None:
    # The implementation draws rows as default_rng(seed).integers(0, n, size=(n_boot, n)).
    y_true, y_pred, y_score = random_case
    n, n_boot, seed = len(y_true), 60, 3
    m = compute_metrics(y_true, y_pred, y_score, codes=CODES, n_boot=n_boot, seed=seed)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    f1s = [f1_score(y_true[i], y_pred[i], average="micro", zero_division=0) for i in idx]
    hams = [hamming_loss(y_true[i], y_pred[i]) for i in idx]
    aucs = [roc_auc_score(y_true[i].ravel(), y_score[i].ravel()) for i in idx]
    for name, vals in (("f1_micro", f1s), ("hamming_loss", hams), ("roc_auc_micro", aucs)):
        lo, hi = np.percentile(vals, [2.5, 97.5])
        assert m[f"{name}_lo"] == pytest.approx(lo) and m[f"{name}_hi"] == pytest.approx(hi), name


def test_weighted_auc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(0)
    n, k = 40, 3
    y = rng.random((n, k)) < 0.4
    s = np.round(rng.random((n, k)), 1)  # many ties
    w = rng.integers(0, 4, size=(5, n))
    got = weighted_micro_auc(y.ravel(), s.ravel(), np.repeat(np.arange(n), k), w)
    want = [roc_auc_score(y.ravel(), s.ravel(), sample_weight=np.repeat(wi, k)) for wi in w]
    np.testing.assert_allclose(got, want)


def test_t_opti_hand_walk() -> None:
    u = np.array([0.4, 0.1, 0.3, 0.3, 0.7, 0.5])
    top1 = np.array([1, 0, 1, 1, 0, 1], dtype=bool)
    top2 = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    # gains (input order): +1, 0 (top-1 wrong), +1, -1, 0, -1
    # stable ascending order: idx 1 (.1), 2 (.3), 3 (.3), 0 (.4), 5 (.5), 4 (.7)
    # walk: idx1 0 -> 0; idx2 +1 -> 1; idx3 -1 -> 0; idx0 +1 -> 1; idx5 -1 -> 0; idx4 0 -> 0
    # max 1 is reached twice (idx2 at u .3, idx0 at u .4): the first index wins -> 0.3
    assert t_opti(u, top1, top2) == 0.3
    # swap the tied samples (idx2 <-> idx3): walk 0, -1, 0, +1 (idx0, u .4), 0, 0 -> 0.4;
    # a non-stable sort could have produced this order from the first input
    top1_s, top2_s = top1[[0, 1, 3, 2, 4, 5]], top2[[0, 1, 3, 2, 4, 5]]
    assert t_opti(u, top1_s, top2_s) == 0.4
    # all gains -1: walk -1, -2 -> max at the first sample (u .1)
    assert t_opti(np.array([0.2, 0.1]), np.array([True, True]), np.array([False, False])) == 0.1
    with pytest.raises(ValueError):
        t_opti(np.array([]), np.array([], dtype=bool), np.array([], dtype=bool))


def test_choose_k() -> None:
    out = choose_k(np.array([0.1, 0.3, 0.5]), 0.3)
    assert out.tolist() == [2, 2, 1]


def _long(values: dict[tuple[str, str], float], metric: str) -> pd.DataFrame:
    rows = [{"model": m, "strategy": s, metric: v} for (m, s), v in values.items()]
    return pd.DataFrame(rows)


def test_generalization_table_higher_is_better() -> None:
    df = _long(
        {("A", "s1"): 0.8, ("A", "s2"): 0.6, ("A", "s3"): 0.7, ("B", "s1"): 0.5, ("B", "s2"): 0.9, ("B", "s3"): 0.5},
        "f1_micro",
    )
    t = generalization_table(df, "f1_micro")
    assert list(t.index) == ["s1", "s2", "s3"]
    assert list(t.columns) == ["A", "B", "mean", "std", "worst", "rank_A", "rank_B"]
    np.testing.assert_allclose(t["mean"], [0.65, 0.75, 0.6])
    np.testing.assert_allclose(t["std"], [0.15, 0.15, 0.1])  # ddof=0: |a - b| / 2
    np.testing.assert_allclose(t["worst"], [0.5, 0.6, 0.5])
    assert t["rank_A"].tolist() == [1, 3, 2]
    assert t["rank_B"].tolist() == [2, 1, 2]  # s1 and s3 tie at 0.5 -> both rank 2 (method="min")


def test_generalization_table_lower_is_better() -> None:
    df = _long(
        {("A", "s1"): 0.1, ("A", "s2"): 0.3, ("A", "s3"): 0.2, ("B", "s1"): 0.2, ("B", "s2"): 0.2, ("B", "s3"): 0.4},
        "hamming_loss",
    )
    t = generalization_table(df, "hamming_loss", higher_is_better=False)
    np.testing.assert_allclose(t["mean"], [0.15, 0.25, 0.3])
    np.testing.assert_allclose(t["std"], [0.05, 0.05, 0.1])
    np.testing.assert_allclose(t["worst"], [0.2, 0.3, 0.4])  # worst = max loss
    assert t["rank_A"].tolist() == [1, 3, 2]
    assert t["rank_B"].tolist() == [1, 1, 3]


def test_ranking_agreement_identical_and_reversed() -> None:
    vals = {
        ("A", "s1"): 0.9,
        ("A", "s2"): 0.7,
        ("A", "s3"): 0.5,
        ("A", "s4"): 0.3,
        ("C", "s1"): 0.6,
        ("C", "s2"): 0.5,
        ("C", "s3"): 0.2,
        ("C", "s4"): 0.1,  # same order as A
        ("D", "s1"): 0.1,
        ("D", "s2"): 0.2,
        ("D", "s3"): 0.3,
        ("D", "s4"): 0.4,
    }  # reversed
    for hib in (True, False):
        r = ranking_agreement(_long(vals, "m"), "m", higher_is_better=hib)
        assert list(r.columns) == ["model_a", "model_b", "tau"]
        tau = {(a, b): t for a, b, t in r.itertuples(index=False)}
        assert tau == pytest.approx({("A", "C"): 1.0, ("A", "D"): -1.0, ("C", "D"): -1.0})


def test_f1_threshold_curve_matches_sklearn(random_case) -> None:
    y_true, _, y_score = random_case
    th = np.linspace(0.0, 1.0, 21)
    want = [f1_score(y_true, y_score >= t, average="micro", zero_division=0) for t in th]
    np.testing.assert_allclose(f1_threshold_curve(y_true, y_score, th), want)


def test_threshold_transfer_hand_case() -> None:
    th = np.array([0.3, 0.5, 0.7])
    y = np.array([[1, 0], [0, 1]], dtype=bool)
    # A: s = .6 P, .4 N, .2 N, .8 P. t=.3: tp2 fp1 -> 4/5; t=.5: tp2 -> 1; t=.7: tp1 fn1 -> 2/3. best .5
    a = np.array([[0.6, 0.4], [0.2, 0.8]])
    # B: s = .35 P, .1 N, .2 N, .9 P. t=.3: tp2 -> 1; t=.5 and .7: tp1 fn1 -> 2/3. best .3
    b = np.array([[0.35, 0.1], [0.2, 0.9]])
    # C: one positive at .9, negative at .1: F1 = 1 at every threshold -> first max, t = .3
    c = (np.array([[1, 0]], dtype=bool), np.array([[0.9, 0.1]]))
    out = threshold_transfer({"A": (y, a), "B": (y, b), "C": c}, th)
    assert list(out.columns) == ["source", "target", "threshold", "f1_at_transferred", "f1_best_target", "f1_lost"]
    got = {
        (r.source, r.target): (r.threshold, r.f1_at_transferred, r.f1_best_target, r.f1_lost)
        for r in out.itertuples(index=False)
    }
    want = {
        ("A", "B"): (0.5, 2 / 3, 1.0, 1 / 3),
        ("A", "C"): (0.5, 1.0, 1.0, 0.0),
        ("B", "A"): (0.3, 0.8, 1.0, 0.2),
        ("B", "C"): (0.3, 1.0, 1.0, 0.0),
        ("C", "A"): (0.3, 0.8, 1.0, 0.2),
        ("C", "B"): (0.3, 1.0, 1.0, 0.0),
    }
    assert set(got) == set(want)
    for key, vals in want.items():
        assert got[key] == pytest.approx(vals), key
    with_self = threshold_transfer({"A": (y, a), "B": (y, b)}, th, include_self=True)
    self_row = with_self[(with_self.source == "A") & (with_self.target == "A")].iloc[0]
    assert self_row.threshold == 0.5 and self_row.f1_lost == 0.0


# ---------------------------------------------------------------- one sort, intervals that scale


def test_ranking_gives_sklearns_values_bit_for_bit() -> None:
    from tokmarg.metrics import Ranking

    rng = np.random.default_rng(7)
    for case in range(60):
        n, k = int(rng.integers(2, 300)), int(rng.integers(1, 5))
        y = rng.random((n, k)) < rng.uniform(0.05, 0.6)
        s = rng.random((n, k))
        if case % 3 == 0:
            s = np.round(s, 1)  # many ties
        r = Ranking.of(y, s)
        if y.any() and not y.all():
            assert r.roc_auc() == roc_auc_score(y.ravel(), s.ravel())
        if y.any():
            assert r.average_precision() == average_precision_score(y.ravel(), s.ravel())
        grid = np.linspace(0, 1, 101)
        assert np.array_equal(r.f1_curve(grid), f1_threshold_curve(y, s, grid))
    assert math.isnan(Ranking.of(np.ones(3, bool), np.arange(3.0)).roc_auc())


def test_ranking_walked_in_blocks_gives_sklearns_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above BLOCK distinct scores the curve sums go a block at a time: same points, same sums."""
    from tokmarg.metrics import Ranking, ranking

    rng = np.random.default_rng(5)
    for block in (1, 2, 3, 7, 64):
        monkeypatch.setattr(ranking, "BLOCK", block)
        for case in range(12):
            n, k = int(rng.integers(2, 120)), int(rng.integers(1, 4))
            y = rng.random((n, k)) < rng.uniform(0.05, 0.6)
            s = rng.random((n, k))
            if case % 2:
                s = np.round(s, 1)  # ties, and collinear runs the ROC curve drops
            r = Ranking.of(y, s)
            if y.any() and not y.all():
                assert r.roc_auc() == pytest.approx(roc_auc_score(y.ravel(), s.ravel()), rel=1e-12, abs=1e-15)
            if y.any():
                got, want = r.average_precision(), average_precision_score(y.ravel(), s.ravel())
                assert got == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_sorted_pairs_walked_in_steps_give_the_same_columns_and_variance(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokmarg.metrics import Ranking, clustered_delong, ranking

    rng = np.random.default_rng(9)
    y = rng.random((150, 4)) < 0.3
    s = np.round(rng.random((150, 4)), 2)  # ties within and across columns
    whole = clustered_delong(y, s)
    grid = np.r_[np.linspace(0, 1, 101), s[3, 1], -1.0, 2.0]  # a threshold equal to a score; none
    flat = Ranking.of(y, s)
    for step in (1, 5, 64, 1000):
        monkeypatch.setattr(ranking, "PAIR_STEP", step)
        r = Ranking.of(y, s, keep_pairs=True)
        assert r.values is None  # read from the scores' own array, which it holds without a copy
        assert np.shares_memory(r.pairs[0], s)
        assert np.array_equal(r.f1_curve(grid), f1_threshold_curve(y, s, grid))
        assert (r.roc_auc(), r.average_precision()) == (flat.roc_auc(), flat.average_precision())
        for j, column in enumerate(r.columns(4)):
            assert column.roc_auc() == roc_auc_score(y[:, j], s[:, j])
            assert column.average_precision() == average_precision_score(y[:, j], s[:, j])
        auc, var = clustered_delong(y, s, r)
        assert auc == pytest.approx(whole[0], rel=1e-12) and var == pytest.approx(whole[1], rel=1e-9)


def test_clustered_delong_hand_cases() -> None:
    from tokmarg.metrics import clustered_delong

    # one pair per row: plain DeLong. Placements 1, 1/2 (positives) and 1, 1/2 (negatives); AUC 3/4,
    # S10 = S01 = 2/1/2 x (1/16 + 1/16) = 1/8, var = 1/8 / 2 + 1/8 / 2 = 1/8
    auc, var = clustered_delong(np.array([[1], [0], [1], [0]], bool), np.array([[0.9], [0.1], [0.4], [0.6]]))
    assert auc == pytest.approx(0.75) and var == pytest.approx(0.125)
    # rows as clusters of 2 pairs: placements per row (1, 1), (2/3, 2/3), (1/3, 1/3); AUC 2/3,
    # S10 = S01 = 3/(2 x 3) x 2/9 = 1/9, S11 = 3/2 x 2/9 = 1/3, var = 1/27 + 1/27 + 2/3 / 9 = 4/27
    y = np.array([[1, 0], [0, 1], [1, 0]], bool)
    s = np.array([[0.8, 0.3], [0.5, 0.6], [0.4, 0.7]])
    auc, var = clustered_delong(y, s)
    assert auc == pytest.approx(2 / 3) and var == pytest.approx(4 / 27)


def test_intervals_above_the_row_bootstrap_limit_agree_with_it() -> None:
    from tokmarg.metrics import headline_intervals
    from tokmarg.metrics.bootstrap import ROW_BOOTSTRAP_MAX

    rng = np.random.default_rng(3)
    n, k = ROW_BOOTSTRAP_MAX + 1000, 4
    y = rng.random((n, k)) < 0.2
    s = np.clip(0.3 * y + 0.7 * rng.random((n, k)) + 0.1 * rng.random((n, 1)), 0, 1)
    p = s >= 0.5
    big = headline_intervals(y, p, s, n_boot=1000, seed=0)
    row = bootstrap_headline(y, p, s, n_boot=1000, seed=0)  # the materialized row bootstrap
    assert (big["f1_micro"].method, big["f1_micro"].replicates) == ("bootstrap-grouped", 1000)
    assert (big["roc_auc_micro"].method, big["roc_auc_micro"].replicates) == ("delong-clustered", 0)
    for m in ("f1_micro", "hamming_loss", "roc_auc_micro"):
        width = row[m][1] - row[m][0]
        assert abs(big[m].lo - row[m][0]) < 0.1 * width and abs(big[m].hi - row[m][1]) < 0.1 * width, m
    small = headline_intervals(y[:500], p[:500], s[:500], n_boot=200, seed=1)
    assert (small["roc_auc_micro"].lo, small["roc_auc_micro"].hi) == bootstrap_headline(
        y[:500], p[:500], s[:500], n_boot=200, seed=1
    )["roc_auc_micro"]  # small runs keep the row bootstrap's numbers
    m = compute_metrics(y, p, s, codes=["a", "b", "c", "d"], n_boot=100)
    assert m["f1_micro_ci_method"] == "bootstrap-grouped" and m["roc_auc_micro_ci_replicates"] == 0


def test_a_columns_ranking_from_the_whole_sort_is_sklearns() -> None:
    from tokmarg.metrics import Ranking

    rng = np.random.default_rng(11)
    y = rng.random((400, 5)) < 0.3
    s = np.round(rng.random((400, 5)), 2)  # ties within and across columns
    whole = Ranking.of(y, s, keep_pairs=True)
    for j, column in enumerate(whole.columns(5)):
        assert column.roc_auc() == roc_auc_score(y[:, j], s[:, j])
        assert column.average_precision() == average_precision_score(y[:, j], s[:, j])
