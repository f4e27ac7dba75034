"""Reduce finished partitions into predictions, metrics and cross-model tables (SPEC §3-4, §6).

Runs on the driver once every partition is there: the uncertainty strategies' dataset-level
step (t_opti) needs all samples of a model, so it happens here and not in the workers. The data
goes one way, a model at a time: its partition files are read column-wise into arrays
(:class:`~tokmarg.columns.ModelArrays`, each file opened once), the uncertainty thresholds are
fitted, each strategy's metrics, F1-versus-threshold curve and reliability bins are computed from
one sort of its scores, and the predictions file is written by streaming the partitions through
once more with the fitted codes. What is kept across models is small: metrics rows, curves on
a 101-point grid, bins, costs.
"""

from __future__ import annotations

import functools
import json
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa

from tokmarg import heap
from tokmarg.columns import (
    REDUCE_COLUMNS,
    ModelArrays,
    StrategyResults,
    code_lists,
    positions_of,
    strategy_index,
    with_fitted_labels,
)
from tokmarg.config import Config, ModelConfig
from tokmarg.data import Dataset
from tokmarg.metrics import (
    ECE_BINS,
    HEADLINE,
    Ranking,
    calibration_bins,
    compute_metrics,
    generalization_table,
    ranking_agreement,
    transfer_table,
)
from tokmarg.metrics.bootstrap import ROW_BOOTSTRAP_MAX
from tokmarg.records import (
    PARQUET_OPTIONS,
    Manifest,
    ModelSummary,
    PartitionMeta,
    RecordError,
    conform,
    prediction_schema,
)
from tokmarg.rundir import (
    LABELS_FILE,
    PartitionFile,
    RunDir,
    RunError,
    atomic_write,
    now,
    parquet_writer,
    slug,
    write_table,
)
from tokmarg.strategies import REGISTRY
from tokmarg.strategies.uncertainty import fit_top_k

if TYPE_CHECKING:  # the worker imports the engine and transformers; the report needs neither
    from tokmarg.worker import Partition

TRANSFER_GRID = np.linspace(0.0, 1.0, 101)
TRANSDUCTIVE_NOTE = "t_opti of the uncertainty strategies is fitted on the evaluated set's own labels (as the paper)"
SPLIT_NOTE = "t_opti of the uncertainty strategies is cross-fitted on 2 held-out halves (seeded)"
CURVES_DIR = "curves"  # RUN/curves/*.csv: per model x score strategy, what the report plots
F1_CURVES = "f1_threshold_curves"
RELIABILITY = "reliability"
CURVE_COLUMNS = {
    F1_CURVES: ["model", "strategy", "threshold", "f1_micro"],
    RELIABILITY: ["model", "strategy", "bin_lo", "bin_hi", "n_pairs", "mean_score", "fraction_true"],
}


@dataclass(frozen=True)
class Truth:
    """The run's samples as the reduce needs them: ids, true codes, the partitions' sample ranges."""

    ids: pa.Array  # (n,) string
    y_true: np.ndarray  # (n, len(codes)) bool
    bounds: np.ndarray  # (partitions, 2) int: partition index -> (start, stop)

    @property
    def n(self) -> int:
        return len(self.ids)

    @functools.cached_property
    def has_safe(self) -> bool:  # asked once per model x strategy
        return bool((~self.y_true.any(axis=1)).any())

    @classmethod
    def of(cls, ds: Dataset, parts: list[Partition]) -> Truth:
        return cls(ds.ids, ds.labels, np.array([(p.start, p.stop) for p in parts], dtype=np.int64).reshape(-1, 2))

    def positions(self, sample_ids: pa.ChunkedArray | pa.Array, indices: Sequence[int]) -> np.ndarray:
        """Each row's sample position, for the rows of a file holding the partitions ``indices``."""
        for i in indices:
            if not 0 <= i < len(self.bounds):
                raise RecordError(f"holds partition {i}, which this run does not have")
        spans = [(int(a), int(b)) for a, b in self.bounds[list(indices)]]
        where = np.concatenate([np.arange(a, b) for a, b in spans]) if spans else np.zeros(0, dtype=np.int64)
        ids = pa.concat_arrays([self.ids.slice(a, b - a) for a, b in spans]) if spans else self.ids.slice(0, 0)
        rows = sample_ids if isinstance(sample_ids, pa.ChunkedArray) else pa.chunked_array([sample_ids])
        if pa.chunked_array([ids]).equals(rows):  # in the order they were written: no lookup
            return where
        return positions_of(sample_ids, ids, where)


@dataclass
class Reduced:
    """What the reduce keeps across models."""

    metrics: list[dict] = field(default_factory=list)
    f1: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # F1 at TRANSFER_GRID, score kinds
    bins: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # (ECE_BINS, 3), score kinds
    t_opti: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    timing: dict[str, ModelSummary] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)


def fit_uncertainty(
    results: Mapping[str, StrategyResults], y_true: np.ndarray, calibration: str, seed: int
) -> dict[str, dict[str, float]]:
    """Set the predicted codes of the fitted kinds' results (in place); strategy -> t_opti."""
    fitted: dict[str, dict[str, float]] = {}
    for strategy, r in results.items():
        if not REGISTRY[strategy].kind.fitted:
            continue
        eligible = ~(r.gate_unsafe == 0.0)  # the gate called these safe: no codes, not in the fit
        keep, fitted[strategy] = fit_top_k(r.uncertainty, r.top, eligible, y_true, calibration, seed)  # type: ignore[arg-type]
        r.set_top_k(keep)
    return fitted


def metrics_row(
    r: StrategyResults,
    y_true: np.ndarray,
    codes: list[str],
    threshold: float,
    has_safe: bool,
    seed: int,
    n_boot: int = 1000,
    ranking: Ranking | None = None,
) -> dict:
    """SPEC §3 metrics of one model x strategy."""
    kind = REGISTRY[r.strategy].kind
    y_score = r.code_scores
    y_pred = kind.codes(y_score, r.named, threshold)
    u_kw: dict = {}
    if has_safe:
        u_score = r.unsafe_score
        u_pred = kind.unsafe(u_score, y_pred, r.unsafe_in_output, threshold)
        u_kw = dict(unsafe_true=y_true.any(axis=1), unsafe_score=u_score, unsafe_pred=u_pred)
    m = compute_metrics(y_true, y_pred, y_score, codes=codes, n_boot=n_boot, seed=seed, ranking=ranking, **u_kw)
    fwd = r.tokens_forwarded
    return {
        "model": r.model,
        "strategy": r.strategy,
        "threshold": threshold,
        **m,
        "tokens_forwarded_per_sample": float(fwd.mean()) if len(fwd) else 0.0,
    }


def cross_model_tables(metrics: pd.DataFrame, f1: Mapping[tuple[str, str], np.ndarray]) -> dict[str, pd.DataFrame]:
    """SPEC §4 tables by file stem: generalization and ranking agreement per headline metric,
    threshold transfer of the score strategies. Empty with fewer than two models.

    ``f1``: (model, strategy) -> micro F1 at every threshold of :data:`TRANSFER_GRID`.
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
        curves = {m: c for (m, s), c in f1.items() if s == strategy}
        if len(curves) >= 2:
            transfers.append(transfer_table(curves, TRANSFER_GRID).assign(strategy=strategy))
    if transfers:
        t = pd.concat(transfers, ignore_index=True)
        tables["threshold_transfer"] = t[["strategy", *[c for c in t.columns if c != "strategy"]]]
    return tables


def curve_frames(
    f1: Mapping[tuple[str, str], np.ndarray], bins: Mapping[tuple[str, str], np.ndarray]
) -> dict[str, pd.DataFrame]:
    """The F1-versus-threshold curves and reliability bins as long frames (``CURVE_COLUMNS``)."""
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    f1_rows = [
        pd.DataFrame({"model": m, "strategy": s, "threshold": TRANSFER_GRID, "f1_micro": c}) for (m, s), c in f1.items()
    ]
    rel = []
    for (m, s), b in bins.items():
        n, sc, y = b[:, 0], b[:, 1], b[:, 2]
        with np.errstate(invalid="ignore", divide="ignore"):
            rel.append(
                pd.DataFrame(
                    {
                        "model": m,
                        "strategy": s,
                        "bin_lo": edges[:-1],
                        "bin_hi": edges[1:],
                        "n_pairs": n.astype(int),
                        "mean_score": np.where(n > 0, sc / np.where(n > 0, n, 1), np.nan),
                        "fraction_true": np.where(n > 0, y / np.where(n > 0, n, 1), np.nan),
                    }
                )
            )
    return {
        F1_CURVES: pd.concat(f1_rows, ignore_index=True) if f1_rows else pd.DataFrame(columns=CURVE_COLUMNS[F1_CURVES]),
        RELIABILITY: pd.concat(rel, ignore_index=True) if rel else pd.DataFrame(columns=CURVE_COLUMNS[RELIABILITY]),
    }


def score_curves(y_true: np.ndarray, ys: np.ndarray, ranking: Ranking | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Micro F1 at every threshold of :data:`TRANSFER_GRID` and the reliability bins of one strategy."""
    ranking = ranking or Ranking.of(y_true, ys)
    return ranking.f1_curve(TRANSFER_GRID), calibration_bins(y_true, ys, ECE_BINS)


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


def _open_model(truth: Truth, rd: RunDir, model: str) -> tuple[list[PartitionFile], list[PartitionMeta]]:
    """A model's partition files, each opened once (footer read), every partition held by exactly
    one; and the partitions' metas."""
    files, metas = [], []
    for path in rd.partition_files(model):
        f, m = rd.open_partition_file(path)
        files.append(f)
        metas += m
    held: dict[int, Path] = {}
    for f in files:
        for i in f.indices:
            if i in held:
                raise RunError(f"{f.path} and {held[i]} both hold partition {i}; delete one and resume")
            held[i] = f.path
    missing = sorted(set(range(len(truth.bounds))) - set(held))
    if missing:
        raise RunError(
            f"{rd.part_path(model, missing[0])}: partition {missing[0]} of model {model!r} is missing "
            f"({len(missing)} in all); run `tokmarg eval --resume {rd.path}` to compute it"
        )
    return files, metas


READ_BATCH_ROWS = 8192  # rows of small files put together before they become arrays


def _read_strategy(cfg: Config, truth: Truth, files: list[PartitionFile], model: str, strategy: str) -> StrategyResults:
    """One model x strategy as arrays: its rows of every file (each file's own row group),
    column-wise, checked to be one per sample. Small files (a partition each, as older runs
    wrote them) are put together up to :data:`READ_BATCH_ROWS` rows before they become arrays."""
    labels = list(cfg.taxonomy.labels)
    arrays = ModelArrays(model, [strategy], truth.n, labels)
    tables: list[pa.Table] = []
    where: list[np.ndarray] = []

    def flush() -> None:
        if tables:
            arrays.add(pa.concat_tables(tables), np.concatenate(where))
            tables.clear()
            where.clear()

    rows = 0

    for f in files:
        try:
            table = conform(f.read(REDUCE_COLUMNS, strategy), labels, REDUCE_COLUMNS)
            strategy_index(table, model, [strategy])  # another model's or strategy's rows: this file's error
            where.append(truth.positions(table.column("sample_id"), f.indices))
        except RecordError as e:
            raise RunError(f"{f.path}: {e}; delete it and resume to recompute it") from None
        tables.append(table)
        rows += table.num_rows
        if rows >= READ_BATCH_ROWS:
            flush()
            rows = 0
    flush()
    try:
        return arrays.results()[strategy]
    except RecordError as e:
        folder = files[0].path.parent if files else model
        raise RunError(f"{folder}: {e}; delete it and resume to recompute it") from None


def _write_predictions(
    cfg: Config, truth: Truth, rd: RunDir, model: str, files: list[PartitionFile], fitted: dict[str, StrategyResults]
) -> None:
    """``predictions/<model>.parquet``: the partition files streamed through once more, a file at
    a time, with the fitted kinds' ``pred_labels`` set."""
    labels = list(cfg.taxonomy.labels)
    codes = list(cfg.taxonomy.codes)
    schema = prediction_schema(labels)
    by_index = [fitted.get(s) for s in cfg.strategies]
    with parquet_writer(rd.path / "predictions" / f"{slug(model)}.parquet", schema, **PARQUET_OPTIONS) as w:
        for f in files:
            table = conform(f.read(schema.names), labels)
            pos = truth.positions(table.column("sample_id"), f.indices)
            index = strategy_index(table, model, cfg.strategies)
            w.write_table(with_fitted_labels(table, index, pos, by_index, codes))


def _reduce_model(cfg: Config, truth: Truth, rd: RunDir, mc: ModelConfig, red: Reduced, load: float | None) -> None:
    """One model, a strategy at a time: read its arrays, fit (uncertainty kinds), measure (metrics,
    curves), keep only what the predictions need; then write the predictions."""
    heap.release()  # what the previous model freed goes back before this one's arrays come
    files, metas = _open_model(truth, rd, mc.name)
    _same_precision(mc.name, metas, rd)
    red.timing[mc.name] = ModelSummary.of(metas, load)
    del metas  # a model's partitions' metas are ~40 MB at 1M samples: summed, then dropped
    codes = list(cfg.taxonomy.codes)
    fitted: dict[str, StrategyResults] = {}
    tokens = 0
    for s in cfg.strategies:
        r = _read_strategy(cfg, truth, files, mc.name, s)
        heap.release(collect=False)  # the read's Arrow buffers and the last strategy's temporaries go back
        t = fit_uncertainty({s: r}, truth.y_true, cfg.calibration, cfg.seed)
        if t:
            red.t_opti.setdefault(mc.name, {}).update(t)
        r.drop_unused(REGISTRY[s].kind.thresholded)
        ys = r.code_scores
        ranking = None if ys is None else Ranking.of(truth.y_true, ys, keep_pairs=truth.n > ROW_BOOTSTRAP_MAX)
        threshold = mc.params[s].threshold
        red.metrics.append(metrics_row(r, truth.y_true, codes, threshold, truth.has_safe, cfg.seed, ranking=ranking))
        if ys is not None and REGISTRY[s].kind.thresholded:
            red.f1[mc.name, s], red.bins[mc.name, s] = score_curves(truth.y_true, ys, ranking)
        tokens += int(r.tokens_forwarded.sum())
        if r.keep is not None:  # what the predictions need of a fitted strategy: its top codes and how many
            fitted[s] = r.slim()
        del r, ys, ranking
    red.t_opti.setdefault(mc.name, {})
    red.tokens[mc.name] = tokens
    heap.release(collect=False)
    _write_predictions(cfg, truth, rd, mc.name, files, fitted)


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
    """Write predictions, labels, metrics, curves, cross-model tables and, last, the manifest."""
    truth = Truth.of(ds, parts)
    # the first of each model's workers that loaded (some never did: released before they were ready)
    loads = {
        w["model"]: w["load_seconds"] for w in reversed(launch.get("workers", [])) if w.get("load_seconds") is not None
    }
    red = Reduced()
    for mc in cfg.models:  # (writing a model's predictions in a thread while the next is measured: 199 s
        # instead of 203 s at 1M x 3, and 1.46 GB instead of 1.33)
        _reduce_model(cfg, truth, rd, mc, red, loads.get(mc.name))
    metrics, tables = _write_tables(cfg, ds, rd.path, red)
    manifest = _manifest(cfg, ds, record, parts, launch, done_before, started, red, tables)
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
    red: Reduced,
    tables: dict[str, pd.DataFrame],
) -> Manifest:
    """What the run was, how it ran and what it cost."""
    job = record["job"]
    tokens = {m: red.tokens.get(m, 0) for m in job["models"]}
    manifest = Manifest(
        command=record.get("command", ""),
        models=job["models"],
        strategies=job["strategies"],
        semantics=job["semantics"],
        engine=job["engine"],
        calibration=cfg.calibration,
        calibration_note=TRANSDUCTIVE_NOTE if cfg.calibration == "transductive" else SPLIT_NOTE,
        t_opti=red.t_opti,
        params_file=cfg.path,
        # where params and dataset came from: the command line, the working directory, or the
        # defaults packaged with tokmarg (no --params / --dataset, none in the working directory)
        inputs_from=record.get("args", {}).get("inputs_from"),
        params=cfg.raw,
        resolved=job["resolved"],
        taxonomy=cfg.taxonomy.name,
        dataset=ds.path,
        dataset_sha256=ds.sha256,
        n_samples=len(ds),
        n_skipped=ds.n_skipped,
        skipped=list(ds.skipped),
        exclude_codes=list(cfg.taxonomy.excluded_codes),
        n_relabeled=ds.n_relabeled,
        partition_size=job["partition_size"],
        partitions={"per_model": len(parts), "done_before_this_session": done_before},
        launch=launch,
        timing=red.timing,
        tokens_forwarded=tokens,
        tables=sorted(f"tables/{n}.csv" for n in tables),
        versions=versions(),
        machine={"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count()},
        started=record.get("created", started),
        finished=now(),
    )
    return manifest


def _write_tables(cfg: Config, ds: Dataset, out: Path, red: Reduced) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """labels.parquet, metrics.csv, curves/*.csv and tables/*.csv; returns the metrics and the tables."""
    # the truth beside the predictions: a report needs no dataset file (runs may combine across machines)
    labels = pa.table({"sample_id": ds.ids, "labels": code_lists(ds.labels, ds.codes)})
    write_table(labels, out / LABELS_FILE, {"codes": list(cfg.taxonomy.codes), "dataset_sha256": ds.sha256})
    metrics = pd.DataFrame(red.metrics)
    # reference: each strategy's own time; fast: the strategies share forwards, so every row
    # shows the time of all of them together
    n = max(1, len(ds))
    metrics["seconds_per_sample"] = [
        red.timing[m].seconds.get(s, red.timing[m].seconds.get("all", float("nan"))) / n
        for m, s in zip(metrics.model, metrics.strategy)
    ]
    atomic_write(out / "metrics.csv", metrics.to_csv(index=False).encode())
    for name, frame in curve_frames(red.f1, red.bins).items():
        atomic_write(out / CURVES_DIR / f"{name}.csv", frame.to_csv(index=False).encode())
    tables = cross_model_tables(metrics, red.f1)
    for name, t in tables.items():
        atomic_write(out / "tables" / f"{name}.csv", t.to_csv(index=False).encode())
    return metrics, tables
