"""Calibration maps: a strategy's raw score in [0, 1] -> a probability, fitted per code.

Pure functions of arrays. A map is data (knots, or two coefficients) written to the policy file
as plain numbers and read back exactly (YAML floats round-trip), and :meth:`CalibrationMap.apply`
is the one function that applies it, in ``calibrate`` and in ``score`` alike.

Worked example (isotonic): scores ``[0.1, 0.2, 0.3, 0.4]`` with labels ``[0, 1, 0, 1]`` pool the
middle pair (the labels go down there): knots ``x = [0.1, 0.2, 0.3, 0.4]``, ``y = [0, 0.5, 0.5, 1]``;
a new score 0.25 maps to 0.5, 0.35 to 0.75 (linear between knots), 0.05 to 0 and 0.9 to 1 (clipped).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.special import expit, logit

from tokmarg.choices import CalibrationMethod, choose

PLATT_EPS = 1e-6  # scores are clipped to [eps, 1 - eps] before the logit (a score of 0 is common)
PLATT_C = 1e4  # inverse L2 strength: next to none, but finite where the fitting rows are separable


@dataclass(frozen=True)
class CalibrationMap:
    """``identity``; ``isotonic`` (linear between knots ``x`` -> ``y``, clipped at both ends);
    ``platt`` (``sigmoid(a * logit(clip(s, eps, 1 - eps)) + b)``)."""

    kind: str
    x: tuple[float, ...] = ()
    y: tuple[float, ...] = ()
    a: float = 1.0
    b: float = 0.0
    eps: float = PLATT_EPS

    def apply(self, scores: np.ndarray) -> np.ndarray:
        """(n,) raw scores -> (n,) calibrated probabilities, float64."""
        s = np.asarray(scores, dtype=np.float64)
        if self.kind == "isotonic":
            return np.interp(s, np.asarray(self.x), np.asarray(self.y))
        if self.kind == "platt":
            return expit(self.a * logit(np.clip(s, self.eps, 1.0 - self.eps)) + self.b)
        return s.copy()

    def to_dict(self) -> dict:
        if self.kind == "isotonic":
            return {"kind": "isotonic", "x": [float(v) for v in self.x], "y": [float(v) for v in self.y]}
        if self.kind == "platt":
            return {"kind": "platt", "a": float(self.a), "b": float(self.b), "eps": float(self.eps)}
        return {"kind": "identity"}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> CalibrationMap:
        """The map a policy file states; ValueError naming ``where`` when it is not one."""
        kind = d.get("kind") if isinstance(d, dict) else None
        if kind == "identity":
            return IDENTITY
        if kind == "isotonic":
            x, y = _numbers(d.get("x"), f"{where}.x"), _numbers(d.get("y"), f"{where}.y")
            if not x or len(x) != len(y):
                raise ValueError(f"{where}: x and y must be non-empty lists of the same length")
            if any(b < a for a, b in zip(x, x[1:])) or any(b < a for a, b in zip(y, y[1:])):
                raise ValueError(f"{where}: the knots must be non-decreasing")
            return cls("isotonic", tuple(x), tuple(y))
        if kind == "platt":
            a, b, eps = (_numbers([d.get(k)], f"{where}.{k}")[0] for k in ("a", "b", "eps"))
            if not 0.0 < eps < 0.5:
                raise ValueError(f"{where}.eps: {eps!r} must be in (0, 0.5)")
            return cls("platt", a=a, b=b, eps=eps)
        raise ValueError(f"{where}.kind: {kind!r} is not identity, isotonic or platt")


IDENTITY = CalibrationMap("identity")


def _numbers(v: object, where: str) -> list[float]:
    if not isinstance(v, list) or not all(isinstance(e, int | float) and not isinstance(e, bool) for e in v):
        raise ValueError(f"{where}: expected a list of numbers")
    if not all(math.isfinite(e) for e in v):
        raise ValueError(f"{where}: expected finite numbers")
    return [float(e) for e in v]


def fit_isotonic(scores: np.ndarray, y: np.ndarray) -> CalibrationMap:
    """scikit-learn's ``IsotonicRegression`` (increasing, in [0, 1], clipped outside the data),
    kept as its knots."""
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    iso.fit(np.asarray(scores, dtype=np.float64), np.asarray(y, dtype=np.float64))
    return CalibrationMap("isotonic", tuple(map(float, iso.X_thresholds_)), tuple(map(float, iso.y_thresholds_)))


def fit_platt(scores: np.ndarray, y: np.ndarray) -> CalibrationMap:
    """Platt scaling: scikit-learn's ``LogisticRegression`` on the score's logit, nearly
    unpenalised (:data:`PLATT_C`)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    z = logit(np.clip(np.asarray(scores, dtype=np.float64), PLATT_EPS, 1.0 - PLATT_EPS))[:, None]  # (n, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        lr = LogisticRegression(C=PLATT_C, max_iter=1000).fit(z, np.asarray(y, dtype=bool))
    return CalibrationMap("platt", a=float(lr.coef_[0, 0]), b=float(lr.intercept_[0]))


def fit_map(method: str, scores: np.ndarray, y: np.ndarray) -> CalibrationMap:
    """The map of ``method`` (:class:`~tokmarg.choices.CalibrationMethod`) fitted on (scores, y)."""
    method = choose(CalibrationMethod, method, "--method")
    if method == CalibrationMethod.ISOTONIC:
        return fit_isotonic(scores, y)
    if method == CalibrationMethod.PLATT:
        return fit_platt(scores, y)
    return IDENTITY
