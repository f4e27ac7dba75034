"""95% intervals of the headline metrics (micro F1, Hamming loss, micro ROC AUC).

Up to :data:`ROW_BOOTSTRAP_MAX` rows: the seeded row bootstrap. A resample is the multiplicity of
every row (how many times it was drawn), so the metric of a resample is a weighted metric of the
original rows: micro F1 and Hamming loss become matrix products, micro ROC AUC a weighted rank
statistic over the flattened (row, code) pairs. That is a resamples x rows matrix, so above the
limit no such matrix is built:

* micro F1 and Hamming loss depend on a row only through its (tp, fp, fn) counts, and rows with
  equal counts are interchangeable. A resample's draws per group of equal rows are multinomial
  (n, group size / n), so the row bootstrap is drawn per group: the same distribution at a cost of
  resamples x groups (a few dozen groups at 14 codes), whatever n is;
* micro ROC AUC gets DeLong's interval with the rows as clusters
  (:func:`tokmarg.metrics.ranking.clustered_delong`), one sort.

Every interval says how it was made (:class:`Interval`), and ``metrics.csv`` carries that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tokmarg.metrics.ranking import Ranking, clustered_delong

ROW_BOOTSTRAP_MAX = 5_000  # rows up to which the resamples x rows bootstrap is drawn as before
Z95 = 1.959963984540054  # the standard normal's 97.5th percentile
BOOTSTRAP = "bootstrap"  # seeded row resamples, each materialized
GROUPED = "bootstrap-grouped"  # seeded row resamples, drawn per group of equal rows
DELONG = "delong-clustered"  # DeLong's variance, rows as clusters; a normal interval clipped to [0, 1]
METHODS = {
    BOOTSTRAP: "seeded row bootstrap",
    GROUPED: "seeded row bootstrap drawn per group of equal rows",
    DELONG: "DeLong's variance with the rows as clusters (normal interval)",
}


@dataclass(frozen=True)
class Interval:
    """A 95% interval and how it was made: ``method`` one of :data:`METHODS`, ``replicates`` the
    resamples drawn (0 for DeLong)."""

    lo: float
    hi: float
    method: str
    replicates: int


_CHUNK_ELEMS = 4_000_000  # resamples x flattened pairs held at once in the AUC step


def resample_counts(rng: np.random.Generator, n: int, n_resamples: int) -> np.ndarray:
    """Draw ``n_resamples`` resamples of ``n`` rows with replacement.

    Returns:
        (n_resamples, n) int array: the multiplicity of every row in every resample.
    """
    idx = rng.integers(0, n, size=(n_resamples, n))
    flat = (idx + (np.arange(n_resamples) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=n_resamples * n).reshape(n_resamples, n)


def weighted_micro_auc(y: np.ndarray, s: np.ndarray, row: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of flattened pairs under per-row weights, for many weight vectors at once.

    Ties in score count 1/2 (same as sklearn's trapezoidal ROC AUC with ``sample_weight``).

    Args:
        y: (m,) bool labels of the flattened pairs.
        s: (m,) float scores of the flattened pairs.
        row: (m,) int row index of every pair.
        weights: (b, n_rows) non-negative row weights (e.g. bootstrap multiplicities).

    Returns:
        (b,) float AUCs; NaN where the weighted positives or negatives total 0.
    """
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    y_sorted = np.asarray(y, dtype=bool)[order]
    row_sorted = row[order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    w = np.atleast_2d(np.asarray(weights, dtype=float))
    out = np.empty(w.shape[0])
    m = max(s.size, 1)
    step = max(1, _CHUNK_ELEMS // m)
    for a in range(0, w.shape[0], step):
        e = w[a : a + step][:, row_sorted]  # (b, m) weight of every sorted pair
        pos = np.add.reduceat(np.where(y_sorted, e, 0.0), starts, axis=1)  # (b, G) per score group
        neg = np.add.reduceat(np.where(y_sorted, 0.0, e), starts, axis=1)
        below = np.cumsum(neg, axis=1) - neg  # negative weight strictly below each group
        num = (pos * (below + 0.5 * neg)).sum(axis=1)
        den = pos.sum(axis=1) * neg.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[a : a + step] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return out


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    """2.5th / 97.5th percentiles of the non-NaN values (NaN, NaN when none)."""
    v = values[~np.isnan(values)]
    if v.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(v, [2.5, 97.5])
    return float(lo), float(hi)


def headline_intervals(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    y_score: np.ndarray | None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    ranking: Ranking | None = None,
) -> dict[str, Interval]:
    """95% intervals of micro F1, Hamming loss and micro ROC AUC (the module docstring says which
    method at which size). ``y_true`` / ``y_pred`` (n, k) bool, ``y_score`` (n, k) float or None;
    ``ranking`` theirs if the caller has it (made with ``keep_pairs``)."""
    yt = np.asarray(y_true, dtype=bool)
    yp = np.asarray(y_pred, dtype=bool)
    n = yt.shape[0]
    if n <= ROW_BOOTSTRAP_MAX:
        return {
            m: Interval(lo, hi, BOOTSTRAP, n_boot)
            for m, (lo, hi) in bootstrap_headline(yt, yp, y_score, n_boot=n_boot, seed=seed).items()
        }
    out = {
        m: Interval(lo, hi, GROUPED, n_boot)
        for m, (lo, hi) in grouped_bootstrap(yt, yp, n_boot=n_boot, seed=seed).items()
    }
    out["roc_auc_micro"] = Interval(float("nan"), float("nan"), DELONG, 0)
    if y_score is not None:
        auc, var = clustered_delong(yt, y_score, ranking)
        if not np.isnan(var):
            half = Z95 * float(np.sqrt(max(var, 0.0)))
            out["roc_auc_micro"] = Interval(max(0.0, auc - half), min(1.0, auc + half), DELONG, 0)
    return out


def grouped_bootstrap(
    y_true: np.ndarray, y_pred: np.ndarray, *, n_boot: int = 1000, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """Row-bootstrap percentile intervals of micro F1 and Hamming loss, drawn per group of rows
    with equal (tp, fp, fn): a resample's draws of the groups are multinomial (n, size / n)."""
    n, k = y_true.shape
    nan2 = (float("nan"), float("nan"))
    if n_boot <= 0 or n == 0 or k == 0:
        return {"f1_micro": nan2, "hamming_loss": nan2}
    c = np.int32 if (k + 1) ** 3 < 2**31 else np.int64  # a row's key fits: half the memory of int64
    tp, fp, fn = (
        (y_true & y_pred).sum(axis=1, dtype=c),
        (~y_true & y_pred).sum(axis=1, dtype=c),
        (y_true & ~y_pred).sum(axis=1, dtype=c),
    )
    key, size = np.unique((tp * (k + 1) + fp) * (k + 1) + fn, return_counts=True)  # one key per distinct row
    groups = np.stack([key // (k + 1) ** 2, key // (k + 1) % (k + 1), key % (k + 1)], axis=1)  # (G, 3) tp, fp, fn
    draws = np.random.default_rng(seed).multinomial(n, size / n, size=n_boot).astype(float)  # (n_boot, G)
    tp, fp, fn = (draws @ groups.astype(float)).T
    den = 2 * tp + fp + fn
    f1 = np.where(den > 0, 2 * tp / np.where(den > 0, den, 1.0), 0.0)
    return {"f1_micro": _percentiles(f1), "hamming_loss": _percentiles((fp + fn) / (n * k))}


def bootstrap_headline(
    y_true: np.ndarray, y_pred: np.ndarray, y_score: np.ndarray | None, *, n_boot: int = 1000, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """Bootstrap 95% percentile intervals for micro F1, Hamming loss and micro ROC AUC.

    Rows are resampled with replacement ``n_boot`` times with ``np.random.default_rng(seed)``;
    resamples where a metric is undefined (NaN; micro ROC AUC with one class) are skipped.

    Args:
        y_true: (n, k) bool labels.
        y_pred: (n, k) bool predictions.
        y_score: (n, k) float scores or None (then the ROC AUC interval is NaN).
        n_boot: number of resamples; 0 gives NaN intervals.
        seed: RNG seed.

    Returns:
        ``{"f1_micro": (lo, hi), "hamming_loss": (lo, hi), "roc_auc_micro": (lo, hi)}``.
    """
    yt = np.asarray(y_true, dtype=bool)
    yp = np.asarray(y_pred, dtype=bool)
    n, k = yt.shape
    nan2 = (float("nan"), float("nan"))
    if n_boot <= 0 or n == 0 or k == 0:
        return {"f1_micro": nan2, "hamming_loss": nan2, "roc_auc_micro": nan2}
    counts = resample_counts(np.random.default_rng(seed), n, n_boot).astype(float)

    tp = counts @ (yt & yp).sum(axis=1)
    fp = counts @ (~yt & yp).sum(axis=1)
    fn = counts @ (yt & ~yp).sum(axis=1)
    den = 2 * tp + fp + fn
    f1 = np.where(den > 0, 2 * tp / np.where(den > 0, den, 1.0), 0.0)
    ham = (counts @ (yt != yp).sum(axis=1)) / (n * k)

    out = {"f1_micro": _percentiles(f1), "hamming_loss": _percentiles(ham), "roc_auc_micro": nan2}
    if y_score is not None:
        s = np.asarray(y_score, dtype=float).ravel()
        row = np.repeat(np.arange(n), k)
        out["roc_auc_micro"] = _percentiles(weighted_micro_auc(yt.ravel(), s, row, counts))
    return out
