"""The report's tables (SPEC §3-4): numeric DataFrames, each also written as a CSV.

Per-(model, strategy) numbers come from the runs' own ``metrics.csv`` and ``curves/*.csv`` (the
F1-versus-threshold curves and reliability bins the reduce computed from the scores); what needs
every model at once (generalization, ranking agreement, threshold transfer) is computed here from
the combined inputs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tokmarg.metrics import HEADLINE
from tokmarg.reduce import CURVE_COLUMNS, F1_CURVES, RELIABILITY, cross_model_tables
from tokmarg.report.inputs import ReportInputs
from tokmarg.strategies import REGISTRY

BINARY = ("unsafe_f1", "unsafe_pr_auc", "unsafe_fpr")


def score_strategies(inputs: ReportInputs) -> list[str]:
    """Strategies whose scores are thresholded into codes (SPEC §2 ``scores`` kind)."""
    return [s for s in inputs.strategies if s in REGISTRY and REGISTRY[s].kind.thresholded]


def headline_table(inputs: ReportInputs) -> pd.DataFrame:
    """model, strategy, then each headline metric with its bootstrap ``_lo`` / ``_hi``."""
    cols = [c for m, _ in HEADLINE for c in (m, f"{m}_lo", f"{m}_hi")]
    m = inputs.metrics
    return m[["model", "strategy", *[c for c in cols if c in m.columns]]].reset_index(drop=True)


def cross_tables(inputs: ReportInputs) -> dict[str, pd.DataFrame]:
    """Generalization, ranking agreement (per headline metric) and threshold transfer; {} for one
    model. A single run's are those its reduce step wrote; several runs' are computed over all
    their models."""
    if inputs.stored_tables is not None:
        return inputs.stored_tables
    return cross_model_tables(inputs.metrics, inputs.f1_at_grid())


def per_code_table(inputs: ReportInputs, metric: str) -> pd.DataFrame:
    """model, strategy, one column per code with ``<metric>/<code>`` (``f1`` or ``roc_auc``)."""
    m = inputs.metrics
    out = m[["model", "strategy"]].copy()
    for c in inputs.codes:
        out[c] = m[f"{metric}/{c}"] if f"{metric}/{c}" in m.columns else np.nan
    if metric != "f1":  # strategies without scores have no AUC at all
        out = out[out[list(inputs.codes)].notna().any(axis=1)]
    return out.reset_index(drop=True)


def support(inputs: ReportInputs) -> pd.Series:
    """Samples labelled with each code."""
    return pd.Series(inputs.y_true.sum(axis=0).astype(int), index=list(inputs.codes), name="support")


def calibration_table(inputs: ReportInputs) -> pd.DataFrame:
    """model, strategy, ece, brier for every strategy with scores."""
    m = inputs.metrics
    out = m[["model", "strategy", "ece", "brier"]]
    return out[out["ece"].notna()].reset_index(drop=True)


def _curves(inputs: ReportInputs, name: str, strategies: list[str]) -> pd.DataFrame:
    """A curves frame of ``strategies``, by strategy then model in the report's order."""
    c = inputs.curves[name]
    c = c[c["strategy"].isin(strategies)]
    order = {(s, m): i for i, (s, m) in enumerate((s, m) for s in strategies for m in inputs.models)}
    key = [order.get((s, m), len(order)) for s, m in zip(c["strategy"], c["model"])]
    c = c.assign(_k=key).sort_values("_k", kind="stable").drop(columns="_k")
    return c[CURVE_COLUMNS[name]].reset_index(drop=True)


def reliability_table(inputs: ReportInputs, strategies: list[str]) -> pd.DataFrame:
    """Reliability diagram data over all (sample, code) pairs: per model x strategy x bin the
    pair count, mean score and fraction of true labels (the bins of the ECE)."""
    return _curves(inputs, RELIABILITY, strategies)


def f1_curves(inputs: ReportInputs, strategies: list[str]) -> pd.DataFrame:
    """Micro F1 of ``scores >= t`` for every t of the grid, per model x strategy (long format)."""
    return _curves(inputs, F1_CURVES, strategies)


def binary_table(inputs: ReportInputs) -> pd.DataFrame | None:
    """The safe/unsafe view per model x strategy; None where the data has no safe rows."""
    if not inputs.has_safe or not set(BINARY) <= set(inputs.metrics.columns):
        return None
    return inputs.metrics[["model", "strategy", *BINARY]].reset_index(drop=True)


def uncertainty_table(inputs: ReportInputs) -> pd.DataFrame:
    """model, strategy, calibration mode and the fitted t_opti of each uncertainty strategy."""
    rows = []
    for run in inputs.runs:
        for model, fitted in run.manifest.t_opti.items():
            for strategy, values in fitted.items():
                rows.append(
                    {
                        "model": model,
                        "strategy": strategy,
                        "calibration": run.manifest.calibration,
                        **{k: v for k, v in values.items() if isinstance(v, (int, float))},
                    }
                )
    return pd.DataFrame(rows)


def model_facts(inputs: ReportInputs) -> pd.DataFrame:
    """Per model: where and how it ran, what it cost."""
    rows = []
    n = max(1, inputs.n_samples)
    for run in inputs.runs:
        man = run.manifest
        for model in man.models:
            t = man.timing.get(model)
            w = next((w for w in man.workers if w.get("model") == model), {})
            tokens = man.tokens_forwarded.get(model, t.tokens_forwarded if t else 0)
            rows.append(
                {
                    "model": model,
                    "run": str(run.path),
                    "launcher": man.launch.get("launcher", ""),
                    "device": w.get("device", ""),
                    "dtype": w.get("dtype", ""),
                    "load_seconds": t.load_seconds if t else None,
                    "scoring_seconds": t.scoring_seconds if t else np.nan,
                    "seconds_per_sample": t.scoring_seconds / n if t else np.nan,
                    "tokens_forwarded": int(tokens),
                    "tokens_per_sample": tokens / n,
                    "shared_prefix_tokens": t.prefix_tokens if t else None,
                    "partitions": t.partitions if t else None,
                    "workers": "; ".join(f"{k}: {v}" for k, v in t.partitions_by_worker.items()) if t else "",
                }
            )
    return pd.DataFrame(rows)


def run_facts(inputs: ReportInputs) -> pd.DataFrame:
    """Per run directory: command, data, semantics, versions, times."""
    rows = []
    for run in inputs.runs:
        man = run.manifest
        rows.append(
            {
                "run": str(run.path),
                "command": man.command,
                "dataset": man.dataset,
                "dataset_sha256": man.dataset_sha256,
                "n_samples": man.n_samples,
                "n_skipped": man.n_skipped,
                "semantics": man.semantics,
                "engine": man.engine,
                "calibration": man.calibration,
                "started": man.started,
                "finished": man.finished,
                **{
                    f"version_{k}": man.versions.get(k, "")
                    for k in ("tokmarg", "torch", "transformers", "ray", "python")
                },
                "machine": man.machine.get("platform", ""),
            }
        )
    return pd.DataFrame(rows)


def params_table(inputs: ReportInputs) -> pd.DataFrame:
    """The resolved parameters each model ran with: model, prompt, strategy, then the params."""
    rows = []
    for run in inputs.runs:
        for model, res in run.manifest.resolved.items():
            for strategy, p in res.get("params", {}).items():
                rows.append({"model": model, "prompt": res.get("prompt", ""), "strategy": strategy, **p})
    return pd.DataFrame(rows)


def _pooled_ece(rel: pd.DataFrame) -> float:
    """ECE over every pair from reliability bins: sum |n (mean score - fraction true)| / sum n."""
    g = rel[rel["n_pairs"] > 0]
    n = g["n_pairs"].sum()
    return float((g["n_pairs"] * (g["mean_score"] - g["fraction_true"]).abs()).sum() / n) if n else float("nan")


def policy_summary(thresholds: pd.DataFrame, reliability: pd.DataFrame) -> pd.DataFrame:
    """Per calibrated model x strategy: method, objective, held-out flagged and micro rates, ECE
    before and after (every held-out (sample, code) pair), and the policy file."""
    rows = []
    for (model, strategy), g in thresholds.groupby(["model", "strategy"], sort=False):
        by = g.set_index("label")
        verdicts = g[g["fitted"].notna()]
        rel = reliability[(reliability["model"] == model) & (reliability["strategy"] == strategy)]
        rows.append(
            {
                "model": model,
                "strategy": strategy,
                "map": ", ".join(sorted(set(verdicts.loc[verdicts["fitted"].astype(bool), "map"]))) or "identity",
                "objective": verdicts["objective"].iloc[0] if len(verdicts) else "",
                "held-out rows": by.at["flagged", "rows"] if "flagged" in by.index else np.nan,
                "flagged precision": by.at["flagged", "precision"] if "flagged" in by.index else np.nan,
                "flagged recall": by.at["flagged", "recall"] if "flagged" in by.index else np.nan,
                "codes F1 (micro)": by.at["codes (micro)", "f1"] if "codes (micro)" in by.index else np.nan,
                "raw codes F1 at the run's threshold": next(
                    (by.at[k, "f1"] for k in by.index if str(k).startswith("codes (micro), raw")), np.nan
                ),
                "ECE before": _pooled_ece(rel[rel["when"] == "before"]),
                "ECE after": _pooled_ece(rel[rel["when"] == "after"]),
                "policy": g["policy"].iloc[0],
            }
        )
    return pd.DataFrame(rows)


def policy_codes(codes: pd.DataFrame) -> pd.DataFrame:
    """The per-code thresholds table as shown: one row per model x strategy x verdict."""
    cols = ["model", "strategy", "label", "fitted", "map", "threshold", "support", "precision", "recall", "f1", "fpr"]
    out = codes[[c for c in cols if c in codes.columns]].copy()
    out["ECE before -> after"] = [f"{a:.3f} -> {b:.3f}" for a, b in zip(codes["ece_before"], codes["ece_after"])]
    return out.rename(columns={"label": "code"})
