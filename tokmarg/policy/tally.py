"""A policy's rates on labeled rows, added a batch at a time (memory flat in rows).

The same numbers :func:`tokmarg.policy.fit.fit_strategy` states for its held-out rows, from
counts: confusion counts per verdict at its threshold, the reliability bins of the ECE and the
Brier sums, raw and calibrated; ``flagged``, the codes pooled, and the raw codes at the run's
threshold.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tokmarg.metrics import calibration_bins
from tokmarg.policy.apply import Applied
from tokmarg.policy.fit import rates
from tokmarg.policy.objective import Counts, counts_at

SUMMARY = ("flagged", "codes (micro)", "codes (micro), raw scores at the run's threshold")


class Tally:
    """Running totals of one set of rows under a policy (``labels``: ``unsafe`` first, then codes)."""

    def __init__(self, labels: Sequence[str], global_threshold: float) -> None:
        self.labels, self.t = list(labels), float(global_threshold)
        k = len(self.labels)
        self.counts = np.zeros((k, 4), dtype=np.int64)  # tp, fp, fn, tn per verdict
        self.summary = np.zeros((len(SUMMARY), 4), dtype=np.int64)
        self.bins = {w: np.zeros((k, 15, 3)) for w in ("before", "after")}
        self.sq = {w: np.zeros(k) for w in ("before", "after")}
        self.n = 0

    def add(self, raw: np.ndarray, y: np.ndarray, applied: Applied) -> None:
        """A batch: ``raw`` (m, L) raw scores, ``y`` (m, L) bool labels (``unsafe``: any code)."""
        y = np.asarray(y, dtype=bool)
        self.n += len(y)
        codes = slice(1, None) if self.labels and self.labels[0] == "unsafe" else slice(0, None)
        for j in range(len(self.labels)):
            self.counts[j] += counts_at(applied.flags[:, j].astype(float), y[:, j], 1.0)
            for w, s in (("before", raw[:, j]), ("after", applied.calibrated[:, j])):
                self.bins[w][j] += calibration_bins(y[:, j], s)
                self.sq[w][j] += float(np.sum((np.asarray(s, dtype=float) - y[:, j]) ** 2))
        yc = y[:, codes].ravel()
        self.summary[0] += counts_at(applied.flagged.astype(float), y[:, codes].any(axis=1), 1.0)
        self.summary[1] += counts_at(applied.flags[:, codes].ravel().astype(float), yc, 1.0)
        self.summary[2] += counts_at(np.asarray(raw)[:, codes].ravel(), yc, self.t)

    def verdicts(self) -> dict[str, dict[str, float]]:
        """Per verdict the policy file's ``held_out`` keys: rates, ECE and Brier before/after."""
        out = {}
        for j, lab in enumerate(self.labels):
            r = rates(Counts(*map(int, self.counts[j])))
            for w in ("before", "after"):
                b = self.bins[w][j]
                r[f"ece_{w}"] = float(np.abs(b[:, 1] - b[:, 2]).sum() / self.n) if self.n else float("nan")
            for w in ("before", "after"):
                r[f"brier_{w}"] = float(self.sq[w][j] / self.n) if self.n else float("nan")
            out[lab] = r
        return out

    def totals(self) -> dict[str, dict[str, float]]:
        """``flagged``, the codes pooled, and the raw codes at the run's threshold."""
        return {name: rates(Counts(*map(int, c))) for name, c in zip(SUMMARY, self.summary)}
