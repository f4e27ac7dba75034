"""Threshold objectives: which cut of a code's calibrated scores a policy flags at.

A sample is flagged for a code when its calibrated score is ``>= threshold``. The candidates are
the distinct scores of the fitting rows, plus ``inf`` (flag nothing). Per objective:

- ``f1``: the highest F1 (ties: the highest threshold, fewest flags);
- ``precision>=P``: the lowest threshold whose precision is at least P (the most recall);
- ``recall>=R``: the highest threshold whose recall is at least R (the fewest flags);
- ``fpr<=F``: the lowest threshold whose false-positive rate is at most F.

Where no candidate meets the bound (``precision>=P`` only: flagging nothing has no precision), the
threshold is the one of the highest precision and the objective is marked unmet.

Worked example: calibrated scores ``[0.9, 0.8, 0.8, 0.3]``, labels ``[1, 1, 0, 0]``. Thresholds 0.9,
0.8, 0.3 flag 1, 3, 4 rows with precision 1, 2/3, 1/2 and recall 1/2, 1, 1: ``precision>=0.9`` gives
0.9, ``recall>=1`` gives 0.8, ``f1`` gives 0.8 (F1 0.8 against 2/3 at 0.9), ``fpr<=0`` gives 0.9.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from tokmarg.errors import TokmargError


class ObjectiveError(TokmargError, ValueError):
    """An objective that cannot be read; one line."""


_BOUND = re.compile(r"^(precision|recall)\s*>=\s*([0-9.]+)$|^(fpr)\s*<=\s*([0-9.]+)$")


@dataclass(frozen=True)
class Objective:
    """``f1``, or a bound on one rate: ``precision>=P``, ``recall>=R``, ``fpr<=F``."""

    metric: str  # f1 | precision | recall | fpr
    bound: float | None = None

    @classmethod
    def parse(cls, text: str, where: str = "--objective") -> Objective:
        t = str(text).strip().lower()
        if t == "f1":
            return cls("f1")
        m = _BOUND.match(t)
        if m is None:
            raise ObjectiveError(f"{where}: {text!r} is not f1, precision>=P, recall>=R or fpr<=F")
        metric, value = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        try:
            bound = float(value)
        except ValueError:
            bound = -1.0
        if not 0.0 <= bound <= 1.0:
            raise ObjectiveError(f"{where}: {text!r}: the bound must be a number in [0, 1]")
        return cls(metric, bound)

    def __str__(self) -> str:
        if self.bound is None:
            return self.metric
        return f"{self.metric}{'<=' if self.metric == 'fpr' else '>='}{self.bound:g}"


class Counts(NamedTuple):
    """Confusion counts at a threshold over (n,) rows of one code."""

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def fpr(self) -> float:
        return self.fp / (self.fp + self.tn) if self.fp + self.tn else float("nan")

    @property
    def f1(self) -> float:
        d = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / d if d else float("nan")


def counts_at(scores: np.ndarray, y: np.ndarray, threshold: float) -> Counts:
    """Confusion counts of flagging ``scores >= threshold`` against the labels ``y`` (n,)."""
    flag, y = np.asarray(scores) >= threshold, np.asarray(y, dtype=bool)
    tp = int(np.count_nonzero(flag & y))
    fp = int(np.count_nonzero(flag)) - tp
    pos = int(np.count_nonzero(y))
    return Counts(tp, fp, pos - tp, len(y) - pos - fp)


def choose_threshold(scores: np.ndarray, y: np.ndarray, objective: Objective) -> tuple[float, bool]:
    """The threshold ``objective`` picks on (scores, y) (n,) and whether it meets its bound."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(y, dtype=bool)
    order = np.argsort(-s, kind="stable")
    s_desc, y_desc = s[order], y[order]
    ends = np.flatnonzero(np.r_[s_desc[1:] != s_desc[:-1], True])  # last row of each run of equal scores
    cand = np.r_[np.inf, s_desc[ends]]  # descending: inf flags nothing
    tp = np.r_[0, np.cumsum(y_desc)[ends]].astype(np.float64)
    flagged = np.r_[0, ends + 1].astype(np.float64)
    fp = flagged - tp
    pos, neg = float(y.sum()), float(len(y) - y.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(flagged > 0, tp / np.where(flagged > 0, flagged, 1), np.nan)
        recall = tp / pos if pos else np.full(len(cand), np.nan)
        fpr = fp / neg if neg else np.zeros(len(cand))
        f1 = np.where(2 * tp + fp + (pos - tp) > 0, 2 * tp / (2 * tp + fp + (pos - tp)), 0.0)
    if objective.metric == "f1":
        return float(cand[int(np.argmax(f1))]), True
    if objective.metric == "recall":
        ok = np.flatnonzero(recall >= objective.bound)
        return (float(cand[ok[0]]), True) if ok.size else (float(cand[-1]), False)
    if objective.metric == "fpr":
        ok = np.flatnonzero(fpr <= objective.bound)  # inf (fpr 0) always qualifies
        return float(cand[ok[-1]]), True
    ok = np.flatnonzero(precision >= objective.bound)
    if ok.size:
        return float(cand[ok[-1]]), True
    best = np.nanmax(precision) if np.isfinite(precision).any() else np.nan
    at = np.flatnonzero(precision == best)
    return float(cand[at[-1]] if at.size else cand[-1]), False
