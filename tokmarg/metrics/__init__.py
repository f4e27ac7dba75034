"""Metrics of tokmarg (SPEC §3, §4) and the uncertainty threshold of SPEC §2.

Pure functions over arrays and DataFrames: no model, no file I/O, no printing.
"""

from tokmarg.metrics.bootstrap import METHODS, Interval, bootstrap_headline, headline_intervals, weighted_micro_auc
from tokmarg.metrics.core import (
    ECE_BINS,
    HEADLINE,
    Headline,
    binarize,
    brier_score,
    calibration_bins,
    compute_metrics,
    expected_calibration_error,
)
from tokmarg.metrics.ranking import Ranking, clustered_delong
from tokmarg.metrics.tables import (
    f1_threshold_curve,
    generalization_table,
    ranking_agreement,
    threshold_transfer,
    transfer_table,
)
from tokmarg.metrics.uncertainty import choose_k, t_opti

__all__ = [
    "ECE_BINS",
    "HEADLINE",
    "METHODS",
    "Headline",
    "Interval",
    "Ranking",
    "binarize",
    "bootstrap_headline",
    "brier_score",
    "calibration_bins",
    "choose_k",
    "clustered_delong",
    "compute_metrics",
    "expected_calibration_error",
    "f1_threshold_curve",
    "headline_intervals",
    "generalization_table",
    "ranking_agreement",
    "t_opti",
    "threshold_transfer",
    "transfer_table",
    "weighted_micro_auc",
]
