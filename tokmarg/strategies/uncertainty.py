"""Dataset-level step of the uncertainty strategies: fit t_opti, choose top-1 or top-2.

``transductive`` (the paper): t_opti is fitted on the evaluated samples' own labels.
``split``: 2-fold cross-fitting with a fixed seed; each half's predictions use the
threshold fitted on the other half, so no sample's labels choose its own prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np

from tokmarg.metrics import choose_k, t_opti
from tokmarg.strategies.base import SampleOutput

Calibration = Literal["transductive", "split"]
CALIBRATIONS: tuple[str, ...] = get_args(Calibration)


def fit_predictions(
    uncertainty: np.ndarray,
    ranked: Sequence[Sequence[str]],
    eligible: np.ndarray,
    true_labels: Sequence[Sequence[str]],
    calibration: Calibration,
    seed: int = 0,
) -> tuple[list[tuple[str, ...]], dict[str, float]]:
    """Each sample's predicted codes (its top-1 or top-2 of ``ranked``) and the fitted thresholds.

    ``eligible`` (n,) bool: samples the safe/unsafe gate did not call safe; the others predict
    no codes and take no part in the fit. With fewer than 2 eligible samples (or a fold left
    empty) every sample predicts top-1.
    """
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration {calibration!r}; allowed: {', '.join(CALIBRATIONS)}")
    u_all = np.asarray(uncertainty, dtype=np.float64)
    truth = [frozenset(t) for t in true_labels]
    elig = [int(i) for i in np.flatnonzero(eligible)]
    pred: list[tuple[str, ...]] = [()] * len(u_all)
    if calibration == "transductive":
        folds = [(elig, elig)]
    else:
        perm = np.random.default_rng(seed).permutation(len(elig))
        a = [elig[i] for i in sorted(perm[: len(elig) // 2])]
        b = [elig[i] for i in sorted(perm[len(elig) // 2 :])]
        folds = [(b, a), (a, b)]  # (fit on, apply to)
    fitted: dict[str, float] = {}
    for n, (fit_on, apply_to) in enumerate(folds):
        t = -np.inf
        if len(fit_on) >= 1 and len(elig) >= 2:
            top1 = np.array([ranked[i][0] in truth[i] for i in fit_on])
            top2 = np.array([ranked[i][1] in truth[i] for i in fit_on])
            t = t_opti(u_all[fit_on], top1, top2)
        fitted["t_opti" if calibration == "transductive" else f"t_opti_fold{n}"] = float(t)
        for i, k in zip(apply_to, choose_k(u_all[apply_to], t) if apply_to else []):
            pred[i] = tuple(ranked[i][: int(k)])
    return pred, fitted


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
