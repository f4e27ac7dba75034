"""Cross-model generalization tables (SPEC §4): DataFrames in, DataFrames out."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pandas as pd
from scipy.stats import kendalltau


def _wide(metrics: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Pivot a long (model, strategy, metric) frame to strategies x models, keeping first-seen order."""
    missing = {"model", "strategy", metric} - set(metrics.columns)
    if missing:
        raise ValueError(f"metrics frame lacks columns {sorted(missing)}")
    wide = metrics.pivot(index="strategy", columns="model", values=metric)
    wide = wide.reindex(index=pd.unique(metrics["strategy"]), columns=pd.unique(metrics["model"]))
    wide.index.name, wide.columns.name = "strategy", None
    return wide.astype(float)


def _ranks(wide: pd.DataFrame, higher_is_better: bool) -> pd.DataFrame:
    """Rank strategies within every model column: 1 = best, ties share the lowest rank (method="min")."""
    return wide.rank(axis=0, ascending=not higher_is_better, method="min")


def generalization_table(metrics: pd.DataFrame, metric: str, higher_is_better: bool = True) -> pd.DataFrame:
    """Strategies x models table of one metric with cross-model summaries.

    Args:
        metrics: long frame with columns ``model``, ``strategy`` and ``metric`` (one row per pair).
        metric: the metric column to tabulate.
        higher_is_better: direction of the metric (False for e.g. hamming_loss, ece, brier).

    Returns:
        Frame indexed by ``strategy`` with one column per model (first-seen order), then ``mean``,
        ``std`` (ddof=0), ``worst`` (min if higher_is_better else max) across models (NaN skipped),
        and ``rank_<model>`` per model (1 = best strategy for that model, method="min").
    """
    wide = _wide(metrics, metric)
    models = list(wide.columns)
    out = wide.copy()
    out["mean"] = wide.mean(axis=1)
    out["std"] = wide.std(axis=1, ddof=0)
    out["worst"] = wide.min(axis=1) if higher_is_better else wide.max(axis=1)
    ranks = _ranks(wide, higher_is_better)
    for m in models:
        out[f"rank_{m}"] = ranks[m]
    return out


def ranking_agreement(metrics: pd.DataFrame, metric: str, higher_is_better: bool = True) -> pd.DataFrame:
    """Kendall tau between every pair of models' strategy rankings.

    Args:
        metrics: long frame with columns ``model``, ``strategy``, ``metric``.
        metric: the metric that ranks the strategies.
        higher_is_better: direction of the metric.

    Returns:
        Frame with columns ``model_a``, ``model_b``, ``tau`` (one row per unordered pair, models in
        first-seen order); strategies missing for either model are dropped; tau is NaN with fewer than
        two common strategies or a constant ranking.
    """
    ranks = _ranks(_wide(metrics, metric), higher_is_better)
    rows = []
    for a, b in itertools.combinations(ranks.columns, 2):
        pair = ranks[[a, b]].dropna()
        tau = float("nan")
        if len(pair) >= 2:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tau = float(kendalltau(pair[a], pair[b]).statistic)
        rows.append({"model_a": a, "model_b": b, "tau": tau})
    return pd.DataFrame(rows, columns=["model_a", "model_b", "tau"])


def f1_threshold_curve(y_true: np.ndarray, y_score: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Micro F1 of ``y_score >= t`` against ``y_true`` at every threshold.

    Args:
        y_true: (n, k) bool labels.
        y_score: (n, k) float scores.
        thresholds: (T,) thresholds.

    Returns:
        (T,) float micro F1 (0 where it is 0/0, as sklearn with ``zero_division=0``).
    """
    yt = np.asarray(y_true, dtype=bool).ravel()
    s = np.asarray(y_score, dtype=float).ravel()
    if yt.shape != s.shape:
        raise ValueError("y_true and y_score must have the same shape")
    th = np.asarray(thresholds, dtype=float).ravel()
    # #pred positives at t = #(s >= t); #true positives at t = #(s >= t among positives)
    s_all = np.sort(s)
    s_pos = np.sort(s[yt])
    n_pred = s.size - np.searchsorted(s_all, th, side="left")
    tp = s_pos.size - np.searchsorted(s_pos, th, side="left")
    den = n_pred + s_pos.size  # 2tp + fp + fn = (tp + fp) + (tp + fn)
    return np.where(den > 0, 2.0 * tp / np.where(den > 0, den, 1), 0.0)


def threshold_transfer(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], thresholds: np.ndarray, include_self: bool = False
) -> pd.DataFrame:
    """Apply each model's F1-best threshold to the other models and measure the F1 lost.

    Args:
        curves: model -> (y_true (n, k) bool, y_score (n, k) float) for one strategy.
        thresholds: (T,) candidate thresholds; a source's threshold is the first one maximizing its
            micro F1.
        include_self: also emit the source -> source rows (f1_lost 0).

    Returns:
        Frame with columns ``source``, ``target``, ``threshold`` (chosen on source),
        ``f1_at_transferred`` (target's micro F1 at that threshold), ``f1_best_target`` (target's best
        micro F1 over ``thresholds``) and ``f1_lost`` = f1_best_target - f1_at_transferred.
    """
    th = np.asarray(thresholds, dtype=float).ravel()
    if th.size == 0:
        raise ValueError("thresholds must not be empty")
    return transfer_table({m: f1_threshold_curve(yt, ys, th) for m, (yt, ys) in curves.items()}, th, include_self)


def transfer_table(f1: dict[str, np.ndarray], thresholds: np.ndarray, include_self: bool = False) -> pd.DataFrame:
    """:func:`threshold_transfer` from each model's micro F1 at every threshold (model -> (T,) array)."""
    th = np.asarray(thresholds, dtype=float).ravel()
    rows = []
    for src in f1:
        i = int(np.argmax(f1[src]))
        for tgt in f1:
            if tgt == src and not include_self:
                continue
            at, best = float(f1[tgt][i]), float(f1[tgt].max())
            rows.append(
                {
                    "source": src,
                    "target": tgt,
                    "threshold": float(th[i]),
                    "f1_at_transferred": at,
                    "f1_best_target": best,
                    "f1_lost": best - at,
                }
            )
    cols = ["source", "target", "threshold", "f1_at_transferred", "f1_best_target", "f1_lost"]
    return pd.DataFrame(rows, columns=cols)
