"""Fit one model x strategy's policy on a labeled run: per verdict (``unsafe`` and each code) a
calibration map and a threshold on the fitting folds, measured on the held-out fold.

Pure functions of arrays. The rows are cut into ``folds`` seeded folds by a hash of their sample
id (:func:`held_out_rows`), so a row's fold depends on its id and the seed only, not on the file's
order or on which other rows are there. The policy is fitted on every fold but one and measured on
that one: no held-out row takes part in fitting the map or choosing the threshold it is measured
with, and scoring the held-out rows again with the policy gives exactly the scores measured.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tokmarg.metrics import brier_score, expected_calibration_error
from tokmarg.policy.maps import IDENTITY, CalibrationMap, fit_map
from tokmarg.policy.objective import Counts, Objective, choose_threshold, counts_at


def held_out_rows(sample_ids: Sequence[str], seed: int, folds: int) -> np.ndarray:
    """(n,) bool: the rows of the held-out fold, those whose ``sha256(f"{seed}:{id}")`` is 0 modulo
    ``folds`` (about 1 in ``folds``)."""
    digest = (hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8] for i in sample_ids)
    return np.fromiter((int.from_bytes(d, "big") % folds == 0 for d in digest), dtype=bool, count=len(sample_ids))


def rates(c: Counts) -> dict[str, float]:
    """Support and the rates at a threshold (NaN where undefined: nothing flagged, no positive...)."""
    return {
        "rows": c.tp + c.fp + c.fn + c.tn,
        "support": c.tp + c.fn,
        "flagged": c.tp + c.fp,
        "precision": c.precision,
        "recall": c.recall,
        "f1": c.f1,
        "fpr": c.fpr,
    }


@dataclass
class VerdictFit:
    """One verdict's (``unsafe`` or a code's) fitted map and threshold, and what they measure."""

    label: str
    map: CalibrationMap
    threshold: float
    fitted: bool  # False: too few positives or negatives to fit (identity map, the strategy's threshold)
    note: str  # why it was not fitted, or whether the objective was met
    objective_met: bool | None  # on the fitting folds; None when not fitted
    fit: dict[str, float] = field(default_factory=dict)  # rates on the fitting folds
    held_out: dict[str, float] = field(default_factory=dict)  # rates, ECE and Brier before/after


@dataclass(frozen=True)
class FitSpec:
    """How verdicts are fitted: the map's method, the threshold's objective, and the fallback."""

    method: str  # isotonic | platt | none
    objective: Objective
    min_positives: int  # fewer fitting positives (or negatives): not fitted
    global_threshold: float  # the strategy's threshold, kept where not fitted


def fit_verdict(
    label: str, raw: np.ndarray, y: np.ndarray, held: np.ndarray, spec: FitSpec
) -> tuple[VerdictFit, np.ndarray]:
    """Fit ``label``'s map and threshold on the rows not ``held``, measure them on the held rows.

    Args:
        raw: (n,) the strategy's raw scores (no score = 0).
        y: (n,) bool true labels.
        held: (n,) bool the held-out rows.
        spec: with fewer than ``spec.min_positives`` positives (or negatives) among the fitting
            rows: not fitted, the identity map and ``spec.global_threshold``.

    Returns:
        The fit and the held-out rows' calibrated scores (m,).
    """
    raw, y, held = np.asarray(raw, dtype=np.float64), np.asarray(y, dtype=bool), np.asarray(held, dtype=bool)
    fit_s, fit_y = raw[~held], y[~held]
    pos = int(fit_y.sum())
    neg = len(fit_y) - pos
    if pos < spec.min_positives or neg < spec.min_positives:
        kind = "positives" if pos < spec.min_positives else "negatives"
        note = f"not fitted: {min(pos, neg)} {kind} in the fitting folds (fewer than {spec.min_positives})"
        m, t, met = IDENTITY, float(spec.global_threshold), None
    else:
        m = fit_map(spec.method, fit_s, fit_y)
        t, met = choose_threshold(m.apply(fit_s), fit_y, spec.objective)
        note = f"{spec.objective} {'met' if met else 'not met'} on the fitting folds"
    cal_fit = m.apply(fit_s)
    cal_held = m.apply(raw[held])
    yh = y[held]
    held_out = {
        **rates(counts_at(cal_held, yh, t)),
        "ece_before": expected_calibration_error(yh, raw[held]),
        "ece_after": expected_calibration_error(yh, cal_held),
        "brier_before": brier_score(yh, raw[held]),
        "brier_after": brier_score(yh, cal_held),
    }
    fit = rates(counts_at(cal_fit, fit_y, t))
    return VerdictFit(label, m, t, met is not None, note, met, fit, held_out), cal_held


@dataclass
class StrategyFit:
    """A model x strategy's verdicts, the held-out rows' calibrated scores and the summary rows."""

    verdicts: list[VerdictFit]  # ``unsafe`` first where the strategy scores it, then the codes
    held_scores: np.ndarray  # (m, len(verdicts)) calibrated scores of the held-out rows
    summary: dict[str, dict[str, float]]  # rates on the held-out rows: flagged, codes (micro), raw codes


def fit_strategy(labels: Sequence[str], raw: np.ndarray, y: np.ndarray, held: np.ndarray, spec: FitSpec) -> StrategyFit:
    """Fit every verdict of one model x strategy.

    Args:
        labels: the verdicts' names: ``"unsafe"`` first when the strategy scores it, then the codes.
        raw: (n, len(labels)) raw scores.
        y: (n, len(labels)) bool true labels (``unsafe``: the sample has any code).
        held: (n,) bool held-out rows.

    ``flagged`` is ``unsafe`` at its threshold or any code at its own.
    """
    fits, held_scores = [], []
    for j, lab in enumerate(labels):
        f, cal = fit_verdict(lab, raw[:, j], y[:, j], held, spec)
        fits.append(f)
        held_scores.append(cal)
    cal = np.stack(held_scores, axis=1) if held_scores else np.zeros((int(held.sum()), 0))
    thresholds = np.array([f.threshold for f in fits])
    flags = cal >= thresholds[None, :]  # (m, len(labels))
    yh = np.asarray(y, dtype=bool)[held]
    codes = slice(1, None) if labels and labels[0] == "unsafe" else slice(0, None)
    any_code = yh[:, codes].any(axis=1)
    flagged = flags.any(axis=1)
    c = flags[:, codes].ravel(), yh[:, codes].ravel()
    raw_codes = np.asarray(raw, dtype=np.float64)[held][:, codes].ravel()
    summary = {
        "flagged": rates(counts_at(flagged.astype(float), any_code, 1.0)),
        "codes (micro)": rates(counts_at(c[0].astype(float), c[1], 1.0)),
        "codes (micro), raw scores at the run's threshold": rates(counts_at(raw_codes, c[1], spec.global_threshold)),
    }
    return StrategyFit(fits, cal, summary)
