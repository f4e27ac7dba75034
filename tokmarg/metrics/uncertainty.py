"""Uncertainty threshold t_opti and top-1 / top-2 choice (SPEC §2)."""

from __future__ import annotations

import numpy as np


def t_opti(u: np.ndarray, top1_true: np.ndarray, top2_true: np.ndarray) -> float:
    """Fit the uncertainty threshold of SPEC §2.

    Samples are sorted by ``u`` ascending with a stable sort (ties keep input order). Walking in
    that order, a running score gains +1 when both of the sample's top-2 codes are true
    (``top1_true & top2_true``), -1 when only the top-1 is true (``top1_true & ~top2_true``) and 0
    otherwise. The threshold is ``u`` at the first index where the running score is highest.

    Args:
        u: (n,) float uncertainties.
        top1_true: (n,) bool, the sample's top-1 code is a true code.
        top2_true: (n,) bool, the sample's top-2 code is a true code.

    Returns:
        t_opti as a float.

    Raises:
        ValueError: on empty input or mismatched shapes.
    """
    u = np.asarray(u, dtype=float).ravel()
    t1 = np.asarray(top1_true, dtype=bool).ravel()
    t2 = np.asarray(top2_true, dtype=bool).ravel()
    if u.size == 0:
        raise ValueError("t_opti needs at least one sample")
    if t1.shape != u.shape or t2.shape != u.shape:
        raise ValueError("u, top1_true and top2_true must have the same length")
    gain = np.where(t1 & t2, 1, np.where(t1 & ~t2, -1, 0))
    order = np.argsort(u, kind="stable")
    running = np.cumsum(gain[order])
    return float(u[order][int(np.argmax(running))])  # argmax returns the first maximum


def choose_k(u: np.ndarray, t: float) -> np.ndarray:
    """How many top codes each sample predicts: 1 where ``u > t``, else 2.

    Args:
        u: (n,) float uncertainties.
        t: the threshold (t_opti).

    Returns:
        (n,) int array of 1s and 2s.
    """
    return np.where(np.asarray(u, dtype=float) > t, 1, 2).astype(int)
