"""Score metrics from one sort: ROC AUC, average precision, F1 against a threshold, DeLong's variance.

:class:`Ranking` sorts (label, score) pairs once and keeps the positive and negative counts at
every distinct score. scikit-learn's ``roc_auc_score`` and ``average_precision_score`` are
functions of exactly those counts; :meth:`Ranking.roc_auc` and
:meth:`Ranking.average_precision` repeat their arithmetic on them (same drop of collinear
points, same trapezoid, same step sum), so the values are scikit-learn's, at one sort per
metric set instead of several passes each (a million rows x 14 codes: ~2 s instead of ~16 s).

:func:`clustered_delong` is the variance of the micro ROC AUC with the rows as clusters
(Obuchowski 1997, "Nonparametric analysis of clustered ROC curve data", Biometrics 53): the
(row, code) pairs of one row are not independent, so the row is the unit, as in a row bootstrap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Ranking:
    """Counts of (label, score) pairs at every distinct score (ascending)."""

    values: np.ndarray  # (G,) distinct scores, ascending
    pos_le: np.ndarray  # (G,) int: positives with a score <= values[g]
    n_le: np.ndarray  # (G,) int: pairs with a score <= values[g]
    # kept for clustered_delong when asked: sort order, sorted labels, each sorted pair's group
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, y: np.ndarray, s: np.ndarray, keep_pairs: bool = False) -> Ranking:
        """Rank the flattened pairs of ``y`` (bool) and ``s`` (float, same shape); ``keep_pairs``
        keeps what :func:`clustered_delong` needs (three arrays of the pairs' size)."""
        yf = np.asarray(y, dtype=bool).ravel()
        sf = np.asarray(s, dtype=np.float64).ravel()
        if yf.shape != sf.shape:
            raise ValueError(f"labels {yf.shape} and scores {sf.shape} differ in shape")
        idx = np.int32 if sf.size < 2**31 else np.int64  # half the memory of the sort's arrays
        order = np.argsort(sf).astype(idx, copy=False)  # the order within ties does not change any count
        ss = sf[order]
        del sf
        ys = yf[order]
        last = np.r_[ss[1:] != ss[:-1], True] if ss.size else np.zeros(0, dtype=bool)
        ends = np.flatnonzero(last)
        pos_le = np.cumsum(ys, dtype=idx)[ends] if ss.size else np.zeros(0, dtype=idx)
        pairs = (order, ys, (np.cumsum(last, dtype=idx) - last)) if keep_pairs else None
        return cls(values=ss[ends], pos_le=pos_le, n_le=(ends + 1).astype(idx), pairs=pairs)

    def column(self, j: int, k: int) -> Ranking:
        """The ranking of column ``j`` of the (n, ``k``) pairs this one ranked (made with
        ``keep_pairs``): its pairs are in score order within the whole's order, so no sort."""
        order, ys, group = self.pairs  # type: ignore[misc]
        code = self._code_of(k)
        g = group[code == j]
        y = ys[code == j]
        last = np.r_[g[1:] != g[:-1], True] if g.size else np.zeros(0, dtype=bool)
        ends = np.flatnonzero(last)
        pos_le = np.cumsum(y, dtype=np.int64)[ends] if g.size else np.zeros(0, dtype=np.int64)
        return Ranking(values=self.values[g[ends]], pos_le=pos_le, n_le=ends.astype(np.int64) + 1)

    def _code_of(self, k: int) -> np.ndarray:
        """Each sorted pair's column (cached: every column asks for it)."""
        cached = self.__dict__.get("_code_cache")
        if cached is None or cached[0] != k:
            dtype = np.int8 if k < 128 else np.int32
            cached = (k, (self.pairs[0] % k).astype(dtype))  # type: ignore[index]
            object.__setattr__(self, "_code_cache", cached)
        return cached[1]

    @property
    def positives(self) -> int:
        return int(self.pos_le[-1]) if self.pos_le.size else 0

    @property
    def size(self) -> int:
        return int(self.n_le[-1]) if self.n_le.size else 0

    def _descending(self) -> tuple[np.ndarray, np.ndarray]:
        """scikit-learn's ``tps`` and ``fps``: positives and negatives with a score >= each
        distinct score, from the highest score down (as float, like its cumulative sums)."""
        below = np.r_[0, self.pos_le[:-1]]
        below_n = np.r_[0, self.n_le[:-1]]
        tps = (self.positives - below)[::-1].astype(np.float64)
        fps = (self.size - below_n)[::-1].astype(np.float64) - tps
        return tps, fps

    def roc_auc(self) -> float:
        """ROC AUC, as ``sklearn.metrics.roc_auc_score``; NaN when the pairs are one class."""
        if self.positives in (0, self.size):
            return float("nan")
        tps, fps = self._descending()
        if fps.shape[0] > 2:  # roc_curve(drop_intermediate=True): drop collinear points
            keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
            fps, tps = fps[keep], tps[keep]
        tps, fps = np.r_[0.0, tps], np.r_[0.0, fps]
        return float(np.trapezoid(tps / tps[-1], fps / fps[-1]))

    def average_precision(self) -> float:
        """Average precision, as ``sklearn.metrics.average_precision_score``; NaN without positives."""
        if self.positives == 0:
            return float("nan")
        tps, fps = self._descending()
        ps = tps + fps
        precision = np.where(ps != 0, np.divide(tps, ps, out=np.zeros_like(tps), where=ps != 0), 0.0)
        recall = tps / tps[-1]
        precision = np.r_[precision[::-1], 1.0]
        recall = np.r_[recall[::-1], 0.0]
        return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))

    def f1_curve(self, thresholds: np.ndarray) -> np.ndarray:
        """Micro F1 of ``score >= t`` at every ``t`` (0 where it is 0/0), as
        :func:`tokmarg.metrics.f1_threshold_curve`."""
        th = np.asarray(thresholds, dtype=float).ravel()
        below = np.searchsorted(self.values, th, side="left")  # groups with a score < t
        prev = below - 1
        n_lt = np.where(below > 0, self.n_le[np.maximum(prev, 0)], 0)
        pos_lt = np.where(below > 0, self.pos_le[np.maximum(prev, 0)], 0)
        n_pred = self.size - n_lt.astype(np.int64)
        tp = self.positives - pos_lt.astype(np.int64)
        den = n_pred + self.positives
        return np.where(den > 0, 2.0 * tp / np.where(den > 0, den, 1), 0.0)


def clustered_delong(y: np.ndarray, s: np.ndarray, ranking: Ranking | None = None) -> tuple[float, float]:
    """Micro ROC AUC of (n, k) labels and scores, and its variance with the n rows as clusters
    (``ranking``: theirs, made with ``keep_pairs``, to save the sort).

    Placements: a positive pair's is the share of negative pairs scored below it (ties 1/2), a
    negative pair's the share of positive pairs scored above it. With ``S10_i`` / ``S01_i`` the sums
    of row i's positive / negative placements, ``m_i`` / ``n_i`` its positive / negative pairs,
    ``M`` / ``N`` their totals and ``I10`` / ``I01`` / ``I`` the rows with a positive / a negative / any
    (Obuchowski 1997, eq. 3-5)::

        S10 = I10 / ((I10 - 1) M) sum_i (S10_i - m_i A)^2
        S01 = I01 / ((I01 - 1) N) sum_i (S01_i - n_i A)^2
        S11 = I / (I - 1) sum_i (S10_i - m_i A) (S01_i - n_i A)
        var(A) = S10 / M + S01 / N + 2 S11 / (M N)

    Returns:
        (AUC, variance); NaN, NaN when the pairs are one class or fewer than 2 rows have each.
    """
    yt = np.asarray(y, dtype=bool)
    n, k = yt.shape
    r = ranking if ranking is not None and ranking.pairs is not None else Ranking.of(yt, s, keep_pairs=True)
    order, ys, group = r.pairs  # type: ignore[misc]
    big_m, big_n = r.positives, r.size - r.positives
    if big_m == 0 or big_n == 0:
        return float("nan"), float("nan")
    neg_le = r.n_le - r.pos_le
    neg_lt = np.r_[0, neg_le[:-1]]
    pos_lt = np.r_[0, r.pos_le[:-1]]
    v10 = (neg_lt + 0.5 * (neg_le - neg_lt)) / big_n  # per group: a positive's placement
    v01 = (big_m - r.pos_le + 0.5 * (r.pos_le - pos_lt)) / big_m  # a negative's
    s10, s01 = np.zeros(n), np.zeros(n)
    step = 1 << 22  # pairs at a time: the temporaries stay small
    for a in range(0, len(order), step):
        o, y_, g = order[a : a + step], ys[a : a + step], group[a : a + step]
        row = o // k
        s10 += np.bincount(row[y_], weights=v10[g[y_]], minlength=n)
        s01 += np.bincount(row[~y_], weights=v01[g[~y_]], minlength=n)
    m_i = yt.sum(axis=1).astype(np.float64)
    n_i = k - m_i
    auc = float(s10.sum() / big_m)
    d10, d01 = s10 - m_i * auc, s01 - n_i * auc
    i10, i01 = int((m_i > 0).sum()), int((n_i > 0).sum())
    if i10 < 2 or i01 < 2:
        return auc, float("nan")
    var10 = i10 / ((i10 - 1) * big_m) * float(np.sum(d10 * d10))
    var01 = i01 / ((i01 - 1) * big_n) * float(np.sum(d01 * d01))
    cov = n / (n - 1) * float(np.sum(d10 * d01))
    return auc, var10 / big_m + var01 / big_n + 2.0 * cov / (big_m * big_n)
