"""Reduce finished partitions into predictions, metrics and cross-model tables (SPEC §3-4, §6).

Runs on the driver once every partition is there: the uncertainty strategies' dataset-level
step (t_opti) needs all samples of a model, so it happens here and not in the workers.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from tokmarg.config import Config
from tokmarg.data import Dataset
from tokmarg.metrics import compute_metrics, generalization_table, ranking_agreement, threshold_transfer
from tokmarg.strategies import REGISTRY, SampleOutput
from tokmarg.strategies.uncertainty import finalize

# the headline metrics of the cross-model table: (column, higher is better)
HEADLINE = (("f1_micro", True), ("hamming_loss", False), ("roc_auc_micro", True))
TRANSFER_GRID = np.linspace(0.0, 1.0, 101)


def _isna(v: object) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA


def finalize_model(df: pd.DataFrame, cfg: Config, ds: Dataset) -> dict[str, dict[str, float]]:
    """Fill ``pred_labels`` of one model's uncertainty rows (in place); return the fitted thresholds."""
    order = {s.id: i for i, s in enumerate(ds.samples)}
    truth = [s.labels for s in ds.samples]
    fitted = {}
    df["pred_labels"] = df["pred_labels"].astype(object)  # cells receive lists
    for strategy in cfg.strategies:
        if REGISTRY[strategy].kind != "uncertainty":
            continue
        idx = df.index[df["strategy"] == strategy]
        idx = sorted(idx, key=lambda i: order[df.at[i, "sample_id"]])
        outs = [
            SampleOutput(
                uncertainty=float(df.at[i, "uncertainty"]),
                ranked=tuple(df.at[i, "ranked"]),
                gate_unsafe=None if _isna(df.at[i, "gate_unsafe"]) else bool(df.at[i, "gate_unsafe"]),
            )
            for i in idx
        ]
        fitted[strategy] = finalize(outs, [truth[order[df.at[i, "sample_id"]]] for i in idx], cfg.calibration, cfg.seed)
        for i, o in zip(idx, outs):
            df.at[i, "pred_labels"] = list(o.pred_labels)
    return fitted


def score_matrix(g: pd.DataFrame, codes: list[str]) -> np.ndarray | None:
    """(n, len(codes)) scores of one model x strategy's rows (missing codes 0); None without scores."""
    scores = [json.loads(s) if isinstance(s, str) else None for s in g["scores"]]
    if not any(s is not None for s in scores):
        return None
    return np.array([[(s or {}).get(c, 0.0) for c in codes] for s in scores], dtype=float)


def label_matrix(labels: Iterable[Iterable[str]], codes: Sequence[str]) -> np.ndarray:
    """(n, len(codes)) bool: which codes each sample is labelled with."""
    rows = [set(lab) for lab in labels]
    return np.array([[c in r for c in codes] for r in rows], dtype=bool).reshape(len(rows), len(codes))


def score_matrices(pred: pd.DataFrame, ids: list[str], codes: list[str]) -> dict[tuple[str, str], np.ndarray | None]:
    """Every (model, strategy)'s scores in the order of ``ids``, parsed once (see :func:`score_matrix`).

    Raises:
        ValueError: naming the model and strategy whose scores are not JSON objects of numbers.
    """
    out = {}
    for (model, strategy), g in pred.groupby(["model", "strategy"], sort=False):
        try:
            out[model, strategy] = score_matrix(in_order(g, ids), codes)
        except (ValueError, AttributeError, TypeError):
            raise ValueError(f"{model} / {strategy}: scores are not JSON objects of numbers") from None
    return out


def in_order(g: pd.DataFrame, ids: list[str]) -> pd.DataFrame:
    """The rows of ``g`` in the order of the sample ids ``ids``."""
    order = {s: i for i, s in enumerate(ids)}
    return g.iloc[np.argsort([order[i] for i in g["sample_id"]])]


def metrics_table(pred: pd.DataFrame, cfg: Config, ds: Dataset, n_boot: int = 1000) -> pd.DataFrame:
    """predictions -> one metrics row per model x strategy (SPEC §3)."""
    codes = list(cfg.taxonomy.codes)
    ids = [s.id for s in ds.samples]
    y_true = label_matrix((s.labels for s in ds.samples), codes)
    out = []
    params = {m.name: m.params for m in cfg.models}
    for (model, strategy), g in pred.groupby(["model", "strategy"], sort=False):
        g = in_order(g, ids)
        kind = REGISTRY[strategy].kind
        thr = params[model][strategy].threshold
        scored = score_matrix(g, ["unsafe", *codes])  # parsed once: column 0 is the binary view
        y_score = None if scored is None else scored[:, 1:]
        if kind == "scores":
            y_pred = y_score >= thr if y_score is not None else np.zeros_like(y_true)
        else:
            y_pred = np.array([[c in set(p) for c in codes] for p in g["pred_labels"]], dtype=bool)
        u_kw: dict = {}
        if ds.has_safe:
            u_score = None if scored is None else scored[:, 0]
            if kind == "scores" and u_score is not None:
                u_pred = u_score >= thr
            elif kind == "codes":  # the output said unsafe (even without a known code)
                flags = [json.loads(e).get("unsafe_in_output", 0.0) if isinstance(e, str) else 0.0 for e in g["extra"]]
                u_pred = np.array(flags, dtype=bool) | y_pred.any(axis=1)
            else:
                u_pred = y_pred.any(axis=1)
            u_kw = dict(unsafe_true=y_true.any(axis=1), unsafe_score=u_score, unsafe_pred=u_pred)
        m = compute_metrics(y_true, y_pred, y_score, codes=codes, n_boot=n_boot, seed=cfg.seed, **u_kw)
        fwd = g["tokens_forwarded"].to_numpy()
        out.append(
            {
                "model": model,
                "strategy": strategy,
                "threshold": thr,
                **m,
                "tokens_forwarded_per_sample": float(fwd.mean()) if len(fwd) else 0.0,
            }
        )
    return pd.DataFrame(out)


def cross_model_tables(
    metrics: pd.DataFrame, scores: Mapping[tuple[str, str], np.ndarray | None], y_true: np.ndarray
) -> dict[str, pd.DataFrame]:
    """SPEC §4 tables by file stem: generalization and ranking agreement per headline metric,
    threshold transfer of the score strategies. Empty with fewer than two models.

    ``scores``: (model, strategy) -> (n, len(codes)) scores in the sample order of ``y_true``
    (:func:`score_matrices`).
    """
    if metrics["model"].nunique() < 2:
        return {}
    tables: dict[str, pd.DataFrame] = {}
    for metric, higher in HEADLINE:
        tables[f"generalization_{metric}"] = generalization_table(metrics, metric, higher).reset_index()
        tables[f"ranking_agreement_{metric}"] = ranking_agreement(metrics, metric, higher)
    transfers = []
    for strategy in pd.unique(metrics["strategy"]):
        if REGISTRY[strategy].kind != "scores":
            continue
        curves = {m: (y_true, ys) for (m, s), ys in scores.items() if s == strategy and ys is not None}
        if len(curves) >= 2:
            transfers.append(threshold_transfer(curves, TRANSFER_GRID).assign(strategy=strategy))
    if transfers:
        t = pd.concat(transfers, ignore_index=True)
        tables["threshold_transfer"] = t[["strategy", *[c for c in t.columns if c != "strategy"]]]
    return tables


def model_timing(metas: list[dict]) -> dict:
    """What the partitions of one model say about cost and placement."""
    where = Counter(
        f"{m['worker'].get('actor') or 'local'} on {m['worker'].get('node_id', m['worker'].get('host', '?'))[:12]}"
        for m in metas
    )
    keys = sorted({k for m in metas for k in m["seconds"]})
    return {
        "partitions": len(metas),
        "seconds": {k: float(sum(m["seconds"].get(k, 0.0) for m in metas)) for k in keys},
        "prefix_tokens": max((m["prefix_tokens"] for m in metas), default=0),
        "prefix_tokens_total": int(sum(m["prefix_tokens"] for m in metas)),  # prefilled once per partition
        "tokens_forwarded": int(sum(m["tokens"] for m in metas)),
        "forward_calls": int(sum(m.get("forward_calls", 0) for m in metas)),
        "partitions_by_worker": dict(where),
        "nodes": sorted({m["worker"].get("node_id") or m["worker"].get("host", "?") for m in metas}),
    }
