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

from tokmarg.reduce import HEADLINE, label_matrix, score_matrices
from tokmarg.rundir import LABELS_FILE, RUN_FILE, parquet_meta
from tokmarg.strategies import REGISTRY

MANIFEST_KEYS = ("models", "strategies", "semantics", "engine", "dataset_sha256", "n_samples")
METRIC_COLUMNS = ("threshold", "ece", "brier", *(f"{m}{s}" for m, _ in HEADLINE for s in ("", "_lo", "_hi")))


class ReportError(ValueError):
    """A run directory cannot be reported (or combined); one line naming it."""


@dataclass(frozen=True)
class Run:
    """One finished run directory."""

    path: Path
    manifest: dict
    metrics: pd.DataFrame  # metrics.csv
    scores: dict[tuple[str, str], np.ndarray | None]  # (model, strategy) -> scores in sample order
    sample_ids: tuple[str, ...]
    labels: tuple[tuple[str, ...], ...]
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


def load_run(path: Path) -> Run:
    """Read one finished run directory; :class:`ReportError` if it is not one."""
    if not path.is_dir():
        raise ReportError(f"{path}: not a directory")
    if not (path / "manifest.json").is_file():
        if (path / RUN_FILE).is_file():
            raise ReportError(f"{path}: the run is not finished (no manifest.json); `tokmarg eval --resume {path}`")
        raise ReportError(f"{path}: not a tokmarg run directory (no manifest.json)")
    manifest = _read_json(path / "manifest.json")
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise ReportError(f"{path / 'manifest.json'}: missing key {missing[0]!r}")
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
        pred = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files else None
    except (OSError, ValueError, pa.ArrowException) as e:
        raise ReportError(f"{path}: cannot read its results ({str(e).splitlines()[0]})") from None
    if pred is None:
        raise ReportError(f"{path}: no predictions/*.parquet")
    for name, frame, cols in (
        ("metrics.csv", metrics, ("model", "strategy", "f1_micro", "hamming_loss", "roc_auc_micro")),
        ("predictions", pred, ("model", "strategy", "sample_id", "scores")),
        (LABELS_FILE, labels, ("sample_id", "labels")),
    ):
        lack = [c for c in cols if c not in frame.columns]
        if lack:
            raise ReportError(f"{path / name}: missing column {lack[0]!r}")
    codes = tuple(meta.get("codes") or [c[3:] for c in metrics.columns if c.startswith("f1/")])
    absent = sorted(set(manifest["models"]) - set(metrics["model"]))
    if absent:
        raise ReportError(f"{path / 'metrics.csv'}: no rows for model {absent[0]!r} of the manifest")
    lack = [c for c in METRIC_COLUMNS if c not in metrics.columns]
    if lack:
        raise ReportError(f"{path / 'metrics.csv'}: missing column {lack[0]!r}")
    ids = [str(i) for i in labels["sample_id"]]
    pred = pred.assign(sample_id=pred["sample_id"].astype(str))
    _check_predictions(path, metrics, pred, ids)
    try:
        scores = score_matrices(pred, ids, list(codes))
    except ValueError as e:
        raise ReportError(f"{path / 'predictions'}: {e}") from None
    return Run(
        path=path,
        manifest=manifest,
        metrics=metrics,
        scores=scores,
        sample_ids=tuple(ids),
        labels=tuple(tuple(v) for v in labels["labels"]),
        codes=codes,
    )


def _check_predictions(path: Path, metrics: pd.DataFrame, pred: pd.DataFrame, ids: list[str]) -> None:
    """Every model x strategy of metrics.csv is a known strategy with one prediction per labelled sample."""
    expected = sorted(ids)
    groups = dict(list(pred.groupby(["model", "strategy"], sort=False)))
    for model, strategy in metrics[["model", "strategy"]].itertuples(index=False):
        if strategy not in REGISTRY:
            raise ReportError(f"{path / 'metrics.csv'}: unknown strategy {strategy!r}")
        g = groups.get((model, strategy))
        if g is None or sorted(g["sample_id"]) != expected:
            n = 0 if g is None else len(g)
            raise ReportError(
                f"{path / 'predictions'}: {model} / {strategy} has {n} predictions, not one for each of the "
                f"{len(ids)} labelled samples"
            )


def combine(runs: list[Run]) -> ReportInputs:
    """Check that the runs describe one dataset and disjoint models; put them together."""
    if not runs:
        raise ReportError("no run directory given")
    first = runs[0]
    owner: dict[str, Path] = {}
    for run in runs:
        a, b = first.manifest["dataset_sha256"], run.manifest["dataset_sha256"]
        if a != b:
            raise ReportError(
                f"{run.path} and {first.path} used different datasets (sha256 {b[:12]}… vs {a[:12]}…); "
                "a report combines runs of one dataset"
            )
        if run.sample_ids != first.sample_ids or run.labels != first.labels:
            raise ReportError(
                f"{run.path} and {first.path} scored different samples of the same dataset "
                f"({len(run.sample_ids)} vs {len(first.sample_ids)}; another --limit or --skip-invalid?)"
            )
        if run.codes != first.codes:
            raise ReportError(f"{run.path} and {first.path} use different taxonomies")
        for model in run.manifest["models"]:
            if model in owner:
                raise ReportError(f"model {model!r} is in both {owner[model]} and {run.path}; give each model once")
            owner[model] = run.path
    metrics = pd.concat([r.metrics.assign(run=str(r.path)) for r in runs], ignore_index=True)
    y_true = label_matrix(first.labels, first.codes)
    score_by = {k: v for r in runs for k, v in r.scores.items()}
    return ReportInputs(tuple(runs), first.codes, first.sample_ids, y_true, metrics, score_by)


def load_inputs(paths: list[Path]) -> ReportInputs:
    """Read and combine run directories (each given once)."""
    seen: set[Path] = set()
    for p in paths:
        if p.resolve() in seen:
            raise ReportError(f"{p}: given twice")
        seen.add(p.resolve())
    return combine([load_run(p) for p in paths])
