"""Per (model, strategy) metrics: classification, ranking, calibration, binary view, CIs (SPEC §3).

Everything here is a pure function of arrays: no model, no file I/O, no printing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from tokmarg.metrics.bootstrap import ROW_BOOTSTRAP_MAX, headline_intervals
from tokmarg.metrics.ranking import Ranking


class Headline(NamedTuple):
    metric: str
    higher_is_better: bool


# the headline metrics (bootstrap intervals, cross-model tables, the report's first tables)
HEADLINE: tuple[Headline, ...] = (
    Headline("f1_micro", True),
    Headline("hamming_loss", False),
    Headline("roc_auc_micro", True),
)
ECE_BINS = 15


def binarize(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Turn scores into positives.

    Args:
        scores: (n, k) float array of per-code scores.
        threshold: a score ``>= threshold`` is a positive.

    Returns:
        (n, k) bool array.
    """
    return np.asarray(scores, dtype=float) >= threshold


def _f1_from_counts(tp: float, fp: float, fn: float) -> float:
    """F1 = 2tp / (2tp + fp + fn); 0 when the denominator is 0 (sklearn ``zero_division=0``)."""
    denom = 2.0 * tp + fp + fn
    return float(2.0 * tp / denom) if denom > 0 else 0.0


def _safe_auc(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC of binary labels ``y`` (m,) against scores ``s`` (m,) (scikit-learn's value);
    NaN when ``y`` is one class."""
    return Ranking.of(y, s).roc_auc()


def _safe_ap(y: np.ndarray, s: np.ndarray) -> float:
    """Average precision of ``y`` (m,) against ``s`` (m,) (scikit-learn's value); NaN when ``y``
    has no positive (undefined)."""
    return Ranking.of(y, s).average_precision()


def calibration_bins(y_true: np.ndarray, y_score: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """Per-bin totals of a reliability diagram over all flattened (sample, code) pairs.

    Bins are ``n_bins`` equal-width intervals on [0, 1]: [0, 1/B), [1/B, 2/B), ..., [(B-1)/B, 1]
    (the last one closed).

    Args:
        y_true: (n, k) or (m,) bool/0-1 labels.
        y_score: same shape, float scores in [0, 1].

    Returns:
        (n_bins, 3) float array: per bin the pair count, the sum of scores and the sum of labels.
    """
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    out = np.zeros((n_bins, 3))
    for y, s in _chunks(y_true, y_score):  # rows at a time: no copy of the whole as float
        y = np.asarray(y, dtype=float).ravel()
        s = np.asarray(s, dtype=float).ravel()
        idx = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, n_bins - 1)
        out += np.stack(
            [
                np.bincount(idx, minlength=n_bins).astype(float),
                np.bincount(idx, weights=s, minlength=n_bins),
                np.bincount(idx, weights=y, minlength=n_bins),
            ],
            axis=1,
        )
    return out


def expected_calibration_error(y_true: np.ndarray, y_score: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error over all flattened (sample, code) pairs, in the bins of
    :func:`calibration_bins`: ECE = sum_b |B_b| / N * |mean(score in b) - mean(y in b)|.

    Args:
        y_true: (n, k) or (m,) bool/0-1 labels.
        y_score: same shape, float scores in [0, 1].

    Returns:
        The ECE as a float; NaN for empty input.
    """
    n = np.asarray(y_score).size
    if n == 0:
        return float("nan")
    bins = calibration_bins(y_true, y_score, n_bins)
    # |B|/N * |sum_s/|B| - sum_y/|B|| == |sum_s - sum_y| / N  (empty bins contribute 0)
    return float(np.abs(bins[:, 1] - bins[:, 2]).sum() / n)


def brier_score(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Mean squared error between scores and 0/1 labels over all flattened pairs (NaN if empty)."""
    n = np.asarray(y_score).size
    if n == 0:
        return float("nan")
    total = 0.0
    for y, s in _chunks(y_true, y_score):
        y = np.asarray(y, dtype=float).ravel()
        s = np.asarray(s, dtype=float).ravel()
        total += float(np.sum((s - y) ** 2))
    return total / n


CHUNK_ROWS = 1 << 15  # rows per step of the metrics that would otherwise copy the whole (n, k) as float


def _chunks(y: np.ndarray, s: np.ndarray):  # noqa: ANN202 - an iterator of array pairs
    """(y, s) a block of rows at a time (the whole at once up to :data:`CHUNK_ROWS` rows)."""
    y, s = np.asarray(y), np.asarray(s)
    if y.ndim < 2 or len(y) <= CHUNK_ROWS:
        yield y, s
        return
    for a in range(0, len(y), CHUNK_ROWS):
        yield y[a : a + CHUNK_ROWS], s[a : a + CHUNK_ROWS]


def _binary_view(
    unsafe_true: np.ndarray, unsafe_score: np.ndarray | None, unsafe_pred: np.ndarray | None
) -> dict[str, float]:
    """Binary safe/unsafe metrics: ``unsafe_f1``, ``unsafe_pr_auc``, ``unsafe_fpr``."""
    yt = np.asarray(unsafe_true, dtype=bool).ravel()
    if unsafe_pred is not None:
        yp: np.ndarray | None = np.asarray(unsafe_pred, dtype=bool).ravel()
    elif unsafe_score is not None:
        yp = np.asarray(unsafe_score, dtype=float).ravel() >= 0.5
    else:
        yp = None
    for name, arr in (("unsafe_pred", yp), ("unsafe_score", unsafe_score)):
        if arr is not None and np.asarray(arr).ravel().shape != yt.shape:
            raise ValueError(f"{name} must have shape {yt.shape}")
    out = {"unsafe_f1": float("nan"), "unsafe_pr_auc": float("nan"), "unsafe_fpr": float("nan")}
    if yp is not None:
        out["unsafe_f1"] = _f1_from_counts((yt & yp).sum(), (~yt & yp).sum(), (yt & ~yp).sum())
        safe = ~yt
        if safe.any():
            out["unsafe_fpr"] = float(yp[safe].mean())
    if unsafe_score is not None:
        out["unsafe_pr_auc"] = _safe_ap(yt, np.asarray(unsafe_score, dtype=float).ravel())
    return out


def compute_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    y_score: np.ndarray | None,
    *,
    codes: Sequence[str],
    unsafe_true: np.ndarray | None = None,
    unsafe_score: np.ndarray | None = None,
    unsafe_pred: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    ranking: Ranking | None = None,
) -> dict[str, float | str]:
    """All SPEC §3 metrics for one (model, strategy).

    Args:
        y_true: (n, k) bool, true taxonomy codes (k = len(codes); never 'unsafe').
        y_pred: (n, k) bool, predicted codes (binarized scores or a strategy's predicted codes).
        y_score: (n, k) float in [0, 1] (missing scores already 0), or None for strategies without scores.
        codes: the k code names, used in the per-code keys.
        unsafe_true: (n,) bool, row has any label; given only when the data has safe rows.
        unsafe_score: (n,) float score of 'unsafe', optional.
        unsafe_pred: (n,) bool, predicted unsafe; defaults to ``unsafe_score >= 0.5``.
        n_boot: bootstrap resamples for the headline CIs (0 gives NaN CIs).
        seed: seed of ``np.random.default_rng`` for the bootstrap.
        ranking: ``Ranking.of(y_true, y_score, keep_pairs=True)`` when the caller has it (one sort saved).

    Returns:
        Flat dict: ``n_samples``, ``f1_micro``, ``f1_macro``, ``hamming_loss``, ``roc_auc_micro``,
        ``pr_auc_micro``, ``ece``, ``brier``, ``f1/<code>``, ``roc_auc/<code>``, the ``unsafe_*`` keys when
        ``unsafe_true`` is given, and ``<m>_lo`` / ``<m>_hi`` / ``<m>_ci_method`` / ``<m>_ci_replicates`` for
        each ``m`` in ``HEADLINE`` (:mod:`tokmarg.metrics.bootstrap`).
        Undefined values are NaN (ROC AUC when y_true is one class, PR AUC without positives, every
        score-based metric when ``y_score`` is None).
    """
    yt, yp, ys = _checked(y_true, y_pred, y_score, len(codes))
    n, k = yt.shape
    nan = float("nan")
    tp_c = (yt & yp).sum(axis=0)
    fp_c = (~yt & yp).sum(axis=0)
    fn_c = (yt & ~yp).sum(axis=0)
    per_f1 = [_f1_from_counts(tp_c[j], fp_c[j], fn_c[j]) for j in range(k)]
    out: dict[str, float | str] = {
        "n_samples": n,
        "f1_micro": _f1_from_counts(tp_c.sum(), fp_c.sum(), fn_c.sum()),
        "f1_macro": float(np.mean(per_f1)) if k else nan,
        "hamming_loss": float(np.mean(yt != yp)) if yt.size else nan,
    }
    if ys is not None and ranking is None:
        ranking = Ranking.of(yt, ys, keep_pairs=n > ROW_BOOTSTRAP_MAX)
    out.update(_score_metrics(yt, ys, ranking))
    columns = ranking.columns(k) if ys is not None and ranking is not None and ranking.pairs is not None else None
    for j, code in enumerate(codes):
        out[f"f1/{code}"] = per_f1[j]
        if ys is None:
            out[f"roc_auc/{code}"] = nan
        elif columns is not None:  # from the micro ranking's sort, a column at a time
            out[f"roc_auc/{code}"] = next(columns).roc_auc()
        else:
            out[f"roc_auc/{code}"] = _safe_auc(yt[:, j], ys[:, j])
    if unsafe_true is not None:
        if np.asarray(unsafe_true).ravel().shape != (n,):
            raise ValueError(f"unsafe_true must have shape ({n},)")
        out.update(_binary_view(unsafe_true, unsafe_score, unsafe_pred))
    cis = headline_intervals(yt, yp, ys, n_boot=n_boot, seed=seed, ranking=ranking)
    for m, _ in HEADLINE:
        ci = cis[m]
        out[f"{m}_lo"], out[f"{m}_hi"] = (nan, nan) if np.isnan(out[m]) else (ci.lo, ci.hi)
        out[f"{m}_ci_method"], out[f"{m}_ci_replicates"] = ci.method, ci.replicates
    return out


def _checked(
    y_true: np.ndarray, y_pred: np.ndarray, y_score: np.ndarray | None, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The arrays as bool, bool, float, their shapes checked against (n, k)."""
    yt = np.asarray(y_true, dtype=bool)
    yp = np.asarray(y_pred, dtype=bool)
    if yt.ndim != 2 or yt.shape[1] != k:
        raise ValueError(f"y_true must have shape (n, {k}), got {yt.shape}")
    if yp.shape != yt.shape:
        raise ValueError(f"y_pred shape {yp.shape} != y_true shape {yt.shape}")
    if y_score is None:
        return yt, yp, None
    ys = np.asarray(y_score, dtype=float)
    if ys.shape != yt.shape:
        raise ValueError(f"y_score shape {ys.shape} != y_true shape {yt.shape}")
    return yt, yp, ys


def _score_metrics(yt: np.ndarray, ys: np.ndarray | None, ranking: Ranking | None) -> dict[str, float]:
    """Micro ROC and PR AUC, ECE and Brier of the scores (NaN without scores)."""
    if ys is None or ranking is None:
        return dict.fromkeys(("roc_auc_micro", "pr_auc_micro", "ece", "brier"), float("nan"))
    return {
        "roc_auc_micro": ranking.roc_auc(),
        "pr_auc_micro": ranking.average_precision(),
        "ece": expected_calibration_error(yt, ys),
        "brier": brier_score(yt, ys),
    }
