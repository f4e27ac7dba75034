"""Reduce finished partitions into predictions, metrics and cross-model tables (SPEC §3-4, §6).

Runs on the driver once every partition is there: the uncertainty strategies' dataset-level
step (t_opti) needs all samples of a model, so it happens here and not in the workers. Every
step works on :class:`~tokmarg.records.StrategyResults`, the arrays of one model x strategy.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from tokmarg.config import Config, ModelConfig
from tokmarg.data import Dataset
from tokmarg.metrics import HEADLINE, compute_metrics, generalization_table, ranking_agreement, threshold_transfer
from tokmarg.records import (
    Manifest,
    ModelSummary,
    PartitionMeta,
    StrategyResults,
    label_matrix,
    strategy_results,
    with_pred_labels,
)
from tokmarg.rundir import LABELS_FILE, RunDir, RunError, atomic_write, now, slug, write_parquet, write_table
from tokmarg.strategies import REGISTRY
from tokmarg.strategies.uncertainty import Calibration, fit_predictions

if TYPE_CHECKING:  # the worker imports the engine and transformers; the report needs neither
    from tokmarg.worker import Partition

TRANSFER_GRID = np.linspace(0.0, 1.0, 101)
TRANSDUCTIVE_NOTE = "t_opti of the uncertainty strategies is fitted on the evaluated set's own labels (as the paper)"
SPLIT_NOTE = "t_opti of the uncertainty strategies is cross-fitted on 2 held-out halves (seeded)"

Results = Mapping[tuple[str, str], StrategyResults]


def fit_uncertainty(
    results: Results, truth: Sequence[Sequence[str]], calibration: Calibration, seed: int
) -> dict[str, dict[str, dict[str, float]]]:
    """Fill ``pred_labels`` of the fitted kinds' results (in place); model -> strategy -> t_opti."""
    fitted: dict[str, dict[str, dict[str, float]]] = {}
    for (model, strategy), r in results.items():
        if not REGISTRY[strategy].kind.fitted:
            continue
        eligible = ~(r.gate_unsafe == 0.0)  # the gate called these safe: no codes, not in the fit
        r.pred_labels, t = fit_predictions(r.uncertainty, r.ranked, eligible, truth, calibration, seed)
        fitted.setdefault(model, {})[strategy] = t
    return fitted


def metrics_row(
    r: StrategyResults,
    y_true: np.ndarray,
    codes: Sequence[str],
    threshold: float,
    has_safe: bool,
    seed: int,
    n_boot: int = 1000,
) -> dict:
    """SPEC §3 metrics of one model x strategy."""
    kind = REGISTRY[r.strategy].kind
    y_score = r.code_scores()
    y_pred = kind.codes(y_score, r.named(codes), threshold)
    u_kw: dict = {}
    if has_safe:
        u_score = None if r.scores is None else r.scores[:, 0]
        u_pred = kind.unsafe(u_score, y_pred, r.unsafe_in_output, threshold)
        u_kw = dict(unsafe_true=y_true.any(axis=1), unsafe_score=u_score, unsafe_pred=u_pred)
    m = compute_metrics(y_true, y_pred, y_score, codes=codes, n_boot=n_boot, seed=seed, **u_kw)
    fwd = r.tokens_forwarded
    return {
        "model": r.model,
        "strategy": r.strategy,
        "threshold": threshold,
        **m,
        "tokens_forwarded_per_sample": float(fwd.mean()) if len(fwd) else 0.0,
    }


def cross_model_tables(
    metrics: pd.DataFrame, scores: Mapping[tuple[str, str], np.ndarray | None], y_true: np.ndarray
) -> dict[str, pd.DataFrame]:
    """SPEC §4 tables by file stem: generalization and ranking agreement per headline metric,
    threshold transfer of the score strategies. Empty with fewer than two models.

    ``scores``: (model, strategy) -> (n, len(codes)) code scores in the sample order of ``y_true``.
    """
    if metrics["model"].nunique() < 2:
        return {}
    tables: dict[str, pd.DataFrame] = {}
    for metric, higher in HEADLINE:
        tables[f"generalization_{metric}"] = generalization_table(metrics, metric, higher).reset_index()
        tables[f"ranking_agreement_{metric}"] = ranking_agreement(metrics, metric, higher)
    transfers = []
    for strategy in pd.unique(metrics["strategy"]):
        if not REGISTRY[strategy].kind.thresholded:
            continue
        curves = {m: (y_true, ys) for (m, s), ys in scores.items() if s == strategy and ys is not None}
        if len(curves) >= 2:
            transfers.append(threshold_transfer(curves, TRANSFER_GRID).assign(strategy=strategy))
    if transfers:
        t = pd.concat(transfers, ignore_index=True)
        tables["threshold_transfer"] = t[["strategy", *[c for c in t.columns if c != "strategy"]]]
    return tables


def versions() -> dict[str, str]:
    pkgs = ("tokmarg", "torch", "transformers", "accelerate", "pandas", "pyarrow", "scikit-learn", "gguf", "ray")
    out = {"python": platform.python_version()}
    for p in pkgs:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def _same_precision(model: str, metas: list[PartitionMeta], rd: RunDir) -> None:
    """A resumed run must not mix partitions scored at different precisions (e.g. fp32 on a CPU,
    bf16 on a GPU, both from ``--dtype auto``)."""
    kinds = {(m.worker.get("dtype"), str(m.worker.get("device", "")).split(":")[0]) for m in metas}
    if len(kinds) > 1:
        seen = ", ".join(f"{d} on {dev}" for d, dev in sorted(kinds, key=str))
        raise RunError(
            f"model {model!r}: partitions were scored at different precisions ({seen}); resume on the same kind "
            f"of device, or delete {rd.path / 'partitions' / slug(model)} to rescore them all"
        )


def _reduce_model(
    cfg: Config, ds: Dataset, rd: RunDir, mc: ModelConfig, parts: list[Partition]
) -> tuple[Results, dict, list[PartitionMeta]]:
    """One model's partitions -> its predictions file (after the uncertainty step), its results
    and fitted thresholds."""
    expected = [(p.index, [s.id for s in p.samples]) for p in parts]
    labels = cfg.taxonomy.labels
    table, metas = rd.read_partitions(mc.name, expected, list(cfg.strategies), labels)
    _same_precision(mc.name, metas, rd)
    results = strategy_results(table, [s.id for s in ds.samples], labels)
    fitted = fit_uncertainty(results, [s.true_codes for s in ds.samples], cfg.calibration, cfg.seed).get(mc.name, {})
    write_table(with_pred_labels(table, results.values()), rd.path / "predictions" / f"{slug(mc.name)}.parquet")
    return results, fitted, metas


def _metrics(
    cfg: Config, ds: Dataset, results: Results, y_true: np.ndarray, timing: dict[str, ModelSummary]
) -> pd.DataFrame:
    """metrics.csv: one row per model x strategy (SPEC §3), with its cost."""
    codes = cfg.taxonomy.codes
    params = {m.name: m.params for m in cfg.models}
    metrics = pd.DataFrame(
        [metrics_row(r, y_true, codes, params[m][s].threshold, ds.has_safe, cfg.seed) for (m, s), r in results.items()]
    )
    # reference: each strategy's own time; fast: the strategies share forwards, so every row
    # shows the time of all of them together
    n = max(1, len(ds.samples))
    metrics["seconds_per_sample"] = [
        timing[m].seconds.get(s, timing[m].seconds.get("all", float("nan"))) / n
        for m, s in zip(metrics.model, metrics.strategy)
    ]
    return metrics


def reduce_run(
    cfg: Config,
    ds: Dataset,
    rd: RunDir,
    record: dict,
    parts: list[Partition],
    launch: dict,
    done_before: int,
    started: str,
) -> tuple[pd.DataFrame, Manifest]:
    """Write predictions, labels, metrics, cross-model tables and, last, the manifest."""
    results: dict[tuple[str, str], StrategyResults] = {}
    timing, thresholds = {}, {}
    # the first of each model's workers that loaded (some never did: released before they were ready)
    loads = {
        w["model"]: w["load_seconds"] for w in reversed(launch.get("workers", [])) if w.get("load_seconds") is not None
    }
    for mc in cfg.models:
        res, thresholds[mc.name], metas = _reduce_model(cfg, ds, rd, mc, parts)
        results.update(res)
        timing[mc.name] = ModelSummary.of(metas, loads.get(mc.name))
    metrics, tables = _write_tables(cfg, ds, rd.path, results, timing)
    manifest = _manifest(cfg, ds, record, parts, launch, done_before, started, results, timing, thresholds, tables)
    atomic_write(rd.path / "manifest.json", (json.dumps(manifest.to_dict(), indent=2, default=str) + "\n").encode())
    return metrics, manifest


def _manifest(
    cfg: Config,
    ds: Dataset,
    record: dict,
    parts: list[Partition],
    launch: dict,
    done_before: int,
    started: str,
    results: Results,
    timing: dict[str, ModelSummary],
    thresholds: dict,
    tables: dict[str, pd.DataFrame],
) -> Manifest:
    """What the run was, how it ran and what it cost."""
    job = record["job"]
    tokens = dict.fromkeys(job["models"], 0)
    for (m, _), r in results.items():
        tokens[m] += int(r.tokens_forwarded.sum())
    manifest = Manifest(
        command=record.get("command", ""),
        models=job["models"],
        strategies=job["strategies"],
        semantics=job["semantics"],
        engine=job["engine"],
        calibration=cfg.calibration,
        calibration_note=TRANSDUCTIVE_NOTE if cfg.calibration == "transductive" else SPLIT_NOTE,
        t_opti=thresholds,
        params_file=cfg.path,
        # where params and dataset came from: the command line, the working directory, or the
        # defaults packaged with tokmarg (no --params / --dataset, none in the working directory)
        inputs_from=record.get("args", {}).get("inputs_from"),
        params=cfg.raw,
        resolved=job["resolved"],
        taxonomy=cfg.taxonomy.name,
        dataset=ds.path,
        dataset_sha256=ds.sha256,
        n_samples=len(ds.samples),
        n_skipped=ds.n_skipped,
        skipped=list(ds.skipped),
        exclude_codes=list(cfg.taxonomy.excluded_codes),
        n_relabeled=ds.n_relabeled,
        partition_size=job["partition_size"],
        partitions={"per_model": len(parts), "done_before_this_session": done_before},
        launch=launch,
        timing=timing,
        tokens_forwarded=tokens,
        tables=sorted(f"tables/{n}.csv" for n in tables),
        versions=versions(),
        machine={"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count()},
        started=record.get("created", started),
        finished=now(),
    )
    return manifest


def _write_tables(
    cfg: Config, ds: Dataset, out: Path, results: Results, timing: dict[str, ModelSummary]
) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """labels.parquet, metrics.csv and tables/*.csv; returns the metrics and the tables."""
    # the truth beside the predictions: a report needs no dataset file (runs may combine across machines)
    labels = pd.DataFrame({"sample_id": [s.id for s in ds.samples], "labels": [list(s.true_codes) for s in ds.samples]})
    write_parquet(labels, out / LABELS_FILE, {"codes": list(cfg.taxonomy.codes), "dataset_sha256": ds.sha256})
    y_true = label_matrix((s.true_codes for s in ds.samples), cfg.taxonomy.codes)
    metrics = _metrics(cfg, ds, results, y_true, timing)
    atomic_write(out / "metrics.csv", metrics.to_csv(index=False).encode())
    tables = cross_model_tables(metrics, {k: r.code_scores() for k, r in results.items()}, y_true)
    for name, t in tables.items():
        atomic_write(out / "tables" / f"{name}.csv", t.to_csv(index=False).encode())
    return metrics, tables
