"""Read finished run directories and combine them into the inputs of one report.

A report needs nothing but run directories: each holds its predictions, its metrics, its
manifest and the true labels (``labels.parquet``). Runs combine when they scored the same
samples of the same dataset file (same SHA-256, same sample ids) with the same taxonomy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tokmarg.errors import TokmargError
from tokmarg.metrics import HEADLINE
from tokmarg.records import Manifest, RecordError, conform, label_matrix, strategy_results
from tokmarg.rundir import LABELS_FILE, RUN_FILE, parquet_meta
from tokmarg.strategies import REGISTRY

METRIC_COLUMNS = ("threshold", "ece", "brier", *(f"{m}{s}" for m, _ in HEADLINE for s in ("", "_lo", "_hi")))


class ReportError(TokmargError, ValueError):
    """A run directory cannot be reported (or combined); one line naming it."""


@dataclass(frozen=True)
class Run:
    """One finished run directory."""

    path: Path
    manifest: Manifest
    metrics: pd.DataFrame  # metrics.csv
    scores: dict[tuple[str, str], np.ndarray | None]  # (model, strategy) -> code scores in sample order
    sample_ids: tuple[str, ...]
    true_codes: tuple[tuple[str, ...], ...]  # each sample's, from labels.parquet
    codes: tuple[str, ...]


@dataclass(frozen=True)
class ReportInputs:
    """Every run of one report, combined; models in the order the runs list them."""

    runs: tuple[Run, ...]
    codes: tuple[str, ...]
    sample_ids: tuple[str, ...]
    y_true: np.ndarray  # (n, len(codes)) bool
    metrics: pd.DataFrame  # every run's metrics.csv, with a ``run`` column
    score_by: dict[tuple[str, str], np.ndarray | None]  # every run's Run.scores
    stored_tables: dict[str, pd.DataFrame] | None = None  # a single run's RUN/tables/*.csv (None: compute them)

    @property
    def models(self) -> list[str]:
        return list(pd.unique(self.metrics["model"]))

    @property
    def strategies(self) -> list[str]:
        return list(pd.unique(self.metrics["strategy"]))

    @property
    def has_safe(self) -> bool:
        return bool((~self.y_true.any(axis=1)).any())

    def scores(self, model: str, strategy: str) -> np.ndarray | None:
        """(n, len(codes)) scores in sample order; None for a strategy without scores."""
        return self.score_by.get((model, strategy))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: cannot read ({e})") from None
    except ValueError as e:
        raise ReportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object")
    return data


def _manifest(path: Path) -> Manifest:
    if not path.is_dir():
        raise ReportError(f"{path}: not a directory")
    if not (path / "manifest.json").is_file():
        if (path / RUN_FILE).is_file():
            raise ReportError(f"{path}: the run is not finished (no manifest.json); `tokmarg eval --resume {path}`")
        raise ReportError(f"{path}: not a tokmarg run directory (no manifest.json)")
    try:
        return Manifest.from_dict(_read_json(path / "manifest.json"))
    except RecordError as e:
        raise ReportError(f"{path / 'manifest.json'}: {e}") from None


def _columns(where: Path, frame_columns: list[str], cols: tuple[str, ...]) -> None:
    lack = [c for c in cols if c not in frame_columns]
    if lack:
        raise ReportError(f"{where}: missing column {lack[0]!r}")


def load_run(path: Path) -> Run:
    """Read one finished run directory; :class:`ReportError` if it is not one."""
    manifest = _manifest(path)
    if not (path / LABELS_FILE).is_file():
        raise ReportError(
            f"{path}: no {LABELS_FILE} (runs reduced before the report existed lack it); "
            f"`tokmarg eval --resume {path}` writes it without rescoring"
        )
    try:
        metrics = pd.read_csv(path / "metrics.csv")
        labels = pd.read_parquet(path / LABELS_FILE)
        meta = parquet_meta(path / LABELS_FILE)
        files = sorted((path / "predictions").glob("*.parquet"))
        tables = [pq.read_table(f) for f in files]
    except (OSError, ValueError, pa.ArrowException) as e:
        raise ReportError(f"{path}: cannot read its results ({str(e).splitlines()[0]})") from None
    if not tables:
        raise ReportError(f"{path}: no predictions/*.parquet")
    _columns(
        path / "metrics.csv", list(metrics.columns), ("model", "strategy", "f1_micro", "hamming_loss", "roc_auc_micro")
    )
    _columns(path / LABELS_FILE, list(labels.columns), ("sample_id", "labels"))
    for f, t in zip(files, tables):
        _columns(f, t.column_names, ("model", "strategy", "sample_id", "scores"))
    codes = tuple(meta.get("codes") or [c[3:] for c in metrics.columns if c.startswith("f1/")])
    absent = sorted(set(manifest.models) - set(metrics["model"]))
    if absent:
        raise ReportError(f"{path / 'metrics.csv'}: no rows for model {absent[0]!r} of the manifest")
    _columns(path / "metrics.csv", list(metrics.columns), METRIC_COLUMNS)
    ids = [str(i) for i in labels["sample_id"]]
    try:  # runs written before the typed columns hold JSON text: conform reads both
        pred = pa.concat_tables([conform(t, ("unsafe", *codes)) for t in tables])
        results = strategy_results(pred, ids, ("unsafe", *codes))
    except RecordError as e:
        raise ReportError(f"{path / 'predictions'}: {e}") from None
    _check_predictions(path, metrics, results)
    return Run(
        path=path,
        manifest=manifest,
        metrics=metrics,
        scores={k: r.code_scores() for k, r in results.items()},
        sample_ids=tuple(ids),
        true_codes=tuple(tuple(v) for v in labels["labels"]),
        codes=codes,
    )


def _check_predictions(path: Path, metrics: pd.DataFrame, results: dict) -> None:
    """Every model x strategy of metrics.csv is a known strategy with predictions (one per
    labelled sample: :func:`~tokmarg.records.strategy_results` checks that)."""
    for model, strategy in metrics[["model", "strategy"]].itertuples(index=False):
        if strategy not in REGISTRY:
            raise ReportError(f"{path / 'metrics.csv'}: unknown strategy {strategy!r}")
        if (model, strategy) not in results:
            raise ReportError(f"{path / 'predictions'}: {model} / {strategy} has no predictions")


def combine(runs: list[Run]) -> ReportInputs:
    """Check that the runs describe one dataset and disjoint models; put them together."""
    if not runs:
        raise ReportError("no run directory given")
    first = runs[0]
    owner: dict[str, Path] = {}
    for run in runs:
        a, b = first.manifest.dataset_sha256, run.manifest.dataset_sha256
        if a != b:
            raise ReportError(
                f"{run.path} and {first.path} used different datasets (sha256 {b[:12]}… vs {a[:12]}…); "
                "a report combines runs of one dataset"
            )
        if run.sample_ids != first.sample_ids or run.true_codes != first.true_codes:
            raise ReportError(
                f"{run.path} and {first.path} scored different samples of the same dataset "
                f"({len(run.sample_ids)} vs {len(first.sample_ids)}; another --limit or --skip-invalid?)"
            )
        if run.codes != first.codes:
            raise ReportError(f"{run.path} and {first.path} use different taxonomies")
        for model in run.manifest.models:
            if model in owner:
                raise ReportError(f"model {model!r} is in both {owner[model]} and {run.path}; give each model once")
            owner[model] = run.path
    metrics = pd.concat([r.metrics.assign(run=str(r.path)) for r in runs], ignore_index=True)
    y_true = label_matrix(first.true_codes, first.codes)
    score_by = {k: v for r in runs for k, v in r.scores.items()}
    stored = _stored_tables(first) if len(runs) == 1 else None  # several runs: tables over all their models
    return ReportInputs(tuple(runs), first.codes, first.sample_ids, y_true, metrics, score_by, stored)


def _stored_tables(run: Run) -> dict[str, pd.DataFrame]:
    """The cross-model tables the run's reduce step wrote (``manifest.tables``)."""
    out = {}
    for rel in run.manifest.tables:
        try:
            out[Path(rel).stem] = pd.read_csv(run.path / rel)
        except (OSError, ValueError) as e:
            raise ReportError(f"{run.path / rel}: cannot read ({str(e).splitlines()[0]})") from None
    return out


def load_inputs(paths: list[Path]) -> ReportInputs:
    """Read and combine run directories (each given once)."""
    seen: set[Path] = set()
    for p in paths:
        if p.resolve() in seen:
            raise ReportError(f"{p}: given twice")
        seen.add(p.resolve())
    return combine([load_run(p) for p in paths])
