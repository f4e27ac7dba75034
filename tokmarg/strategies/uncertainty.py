"""Dataset-level step of the uncertainty strategies: fit t_opti, choose top-1 or top-2.

``transductive`` (the paper): t_opti is fitted on the evaluated samples' own labels.
``split``: 2-fold cross-fitting with a fixed seed; each half's predictions use the
threshold fitted on the other half, so no sample's labels choose its own prediction.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tokmarg.metrics import choose_k, t_opti
from tokmarg.strategies.base import SampleOutput

CALIBRATIONS = ("transductive", "split")


def _fit(outs: Sequence[SampleOutput], truth: Sequence[frozenset[str]]) -> float:
    u = np.array([o.uncertainty for o in outs], dtype=np.float64)
    top1 = np.array([o.ranked[0] in t for o, t in zip(outs, truth)])  # type: ignore[index]
    top2 = np.array([o.ranked[1] in t for o, t in zip(outs, truth)])  # type: ignore[index]
    return t_opti(u, top1, top2)


def finalize(
    outputs: Sequence[SampleOutput], true_labels: Sequence[Sequence[str]], calibration: str, seed: int = 0
) -> dict[str, float]:
    """Fill ``pred_labels`` of every output in place; return the fitted thresholds.

    Samples the safe/unsafe gate called safe predict no codes and take no part in the fit.
    With fewer than 2 eligible samples (or a fold left empty) every sample predicts top-1.
    """
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration {calibration!r}; allowed: {', '.join(CALIBRATIONS)}")
    truth = [frozenset(t) for t in true_labels]
    elig = [i for i, o in enumerate(outputs) if o.gate_unsafe is not False]
    for o in outputs:
        o.pred_labels = ()
    fitted: dict[str, float] = {}
    if calibration == "transductive":
        folds = [(elig, elig)]
    else:
        perm = np.random.default_rng(seed).permutation(len(elig))
        a = [elig[i] for i in sorted(perm[: len(elig) // 2])]
        b = [elig[i] for i in sorted(perm[len(elig) // 2 :])]
        folds = [(b, a), (a, b)]  # (fit on, apply to)
    for n, (fit_on, apply_to) in enumerate(folds):
        if len(fit_on) >= 1 and len(elig) >= 2:
            t = _fit([outputs[i] for i in fit_on], [truth[i] for i in fit_on])
        else:
            t = -np.inf
        fitted["t_opti" if calibration == "transductive" else f"t_opti_fold{n}"] = float(t)
        u = np.array([outputs[i].uncertainty for i in apply_to], dtype=np.float64)
        for i, k in zip(apply_to, choose_k(u, t) if len(apply_to) else []):
            outputs[i].pred_labels = tuple(outputs[i].ranked[: int(k)])  # type: ignore[index]
    return fitted
