"""Dataset-level step of the uncertainty strategies: fit t_opti, choose top-1 or top-2.

``transductive`` (the paper): t_opti is fitted on the evaluated samples' own labels.
``split``: 2-fold cross-fitting with a fixed seed; each half's predictions use the
threshold fitted on the other half, so no sample's labels choose its own prediction.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tokmarg.choices import Calibration, choose
from tokmarg.metrics import choose_k, t_opti
from tokmarg.strategies.base import SampleOutput


def fit_top_k(
    uncertainty: np.ndarray,
    top: np.ndarray,
    eligible: np.ndarray,
    y_true: np.ndarray,
    calibration: Calibration,
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, float]]:
    """How many of its top codes each sample predicts (0, 1 or 2), and the fitted thresholds.

    Args:
        uncertainty: (n,) float.
        top: (n, 2) int: each sample's best and second-best code as a column of ``y_true`` (-1: none).
        eligible: (n,) bool: samples the safe/unsafe gate did not call safe; the others predict no
            codes (0) and take no part in the fit.
        y_true: (n, k) bool true codes.
        calibration: ``transductive`` (fit on all eligible samples) or ``split`` (2 seeded folds,
            each predicted with the threshold of the other).
        seed: seed of the split.

    With fewer than 2 eligible samples (or a fold left empty) the threshold is -inf.
    """
    calibration = choose(Calibration, calibration, "calibration")
    u = np.asarray(uncertainty, dtype=np.float64)
    top = np.asarray(top, dtype=np.int64).reshape(len(u), 2)
    rows = np.arange(len(u))
    hit = [(top[:, j] >= 0) & np.asarray(y_true, dtype=bool)[rows, np.maximum(top[:, j], 0)] for j in (0, 1)]
    elig = np.flatnonzero(eligible)
    k = np.zeros(len(u), dtype=np.int64)
    if calibration == "transductive":
        folds = [(elig, elig)]
    else:
        perm = np.random.default_rng(seed).permutation(len(elig))
        a, b = elig[np.sort(perm[: len(elig) // 2])], elig[np.sort(perm[len(elig) // 2 :])]
        folds = [(b, a), (a, b)]  # (fit on, apply to)
    fitted: dict[str, float] = {}
    for n, (fit_on, apply_to) in enumerate(folds):
        t = -np.inf
        if len(fit_on) >= 1 and len(elig) >= 2:
            t = t_opti(u[fit_on], hit[0][fit_on], hit[1][fit_on])
        fitted["t_opti" if calibration == "transductive" else f"t_opti_fold{n}"] = float(t)
        k[apply_to] = choose_k(u[apply_to], t)
    return k, fitted


def fit_predictions(
    uncertainty: np.ndarray,
    ranked: Sequence[Sequence[str]],
    eligible: np.ndarray,
    true_labels: Sequence[Sequence[str]],
    calibration: Calibration,
    seed: int = 0,
) -> tuple[list[tuple[str, ...]], dict[str, float]]:
    """:func:`fit_top_k` on lists: each sample's predicted codes (its top-1 or top-2 of ``ranked``)
    and the fitted thresholds."""
    codes = sorted({c for r in ranked for c in r[:2]} | {c for t in true_labels for c in t})
    col = {c: j for j, c in enumerate(codes)}
    top = np.array([[col[r[j]] if len(r) > j else -1 for j in (0, 1)] for r in ranked], dtype=np.int64)
    y_true = np.zeros((len(true_labels), len(codes)), dtype=bool)
    for i, t in enumerate(true_labels):
        y_true[i, [col[c] for c in t]] = True
    k, fitted = fit_top_k(uncertainty, top.reshape(len(ranked), 2), eligible, y_true, calibration, seed)
    return [tuple(r[: int(n)]) for r, n in zip(ranked, k)], fitted


def finalize(
    outputs: Sequence[SampleOutput], true_labels: Sequence[Sequence[str]], calibration: Calibration, seed: int = 0
) -> dict[str, float]:
    """:func:`fit_predictions` on engine outputs: fill their ``pred_labels`` in place; return the thresholds."""
    u = np.array([o.uncertainty for o in outputs], dtype=np.float64)
    eligible = np.array([o.gate_unsafe is not False for o in outputs], dtype=bool)
    pred, fitted = fit_predictions(u, [o.ranked or () for o in outputs], eligible, true_labels, calibration, seed)
    for o, p in zip(outputs, pred):
        o.pred_labels = p
    return fitted
