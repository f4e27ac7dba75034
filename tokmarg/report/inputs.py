"""Read finished run directories and combine them into the inputs of one report.

A report needs nothing but run directories: each holds its predictions, its metrics, its
manifest and the true labels (``labels.parquet``). Runs combine when they scored the same
samples of the same dataset file (same SHA-256, same sample ids) with the same taxonomy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tokmarg.columns import SCORE_COLUMNS, ModelArrays, label_matrix, positions_of
from tokmarg.errors import TokmargError
from tokmarg.metrics import HEADLINE
from tokmarg.records import Manifest, RecordError, conform
from tokmarg.reduce import CURVE_COLUMNS, CURVES_DIR, curve_frames, score_curves
from tokmarg.rundir import LABELS_FILE, RUN_FILE, parquet_meta, slug
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
    curves: dict[str, pd.DataFrame]  # F1 against the threshold, reliability bins (reduce.CURVE_COLUMNS)
    sample_ids: pa.Array  # (n,) string
    true_labels: pa.Array  # (n,) list<string>: each sample's codes, from labels.parquet
    codes: tuple[str, ...]
    calibrated: dict[str, pd.DataFrame] = field(default_factory=dict)  # `tokmarg calibrate`'s tables, if run


@dataclass(frozen=True)
class ReportInputs:
    """Every run of one report, combined; models in the order the runs list them."""

    runs: tuple[Run, ...]
    codes: tuple[str, ...]
    n_samples: int
    y_true: np.ndarray  # (n, len(codes)) bool
    metrics: pd.DataFrame  # every run's metrics.csv, with a ``run`` column
    curves: dict[str, pd.DataFrame]  # every run's Run.curves, concatenated
    stored_tables: dict[str, pd.DataFrame] | None = None  # a single run's RUN/tables/*.csv (None: compute them)
    calibrated: dict[str, pd.DataFrame] = field(default_factory=dict)  # thresholds, reliability (calibrate)

    @property
    def models(self) -> list[str]:
        return list(pd.unique(self.metrics["model"]))

    @property
    def strategies(self) -> list[str]:
        return list(pd.unique(self.metrics["strategy"]))

    @property
    def has_safe(self) -> bool:
        return bool((~self.y_true.any(axis=1)).any())

    def f1_at_grid(self) -> dict[tuple[str, str], np.ndarray]:
        """(model, strategy) -> micro F1 at every threshold of the grid, for the score strategies."""
        c = self.curves["f1_threshold_curves"]
        return {(m, s): g["f1_micro"].to_numpy() for (m, s), g in c.groupby(["model", "strategy"], sort=False)}


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
        labels = pq.read_table(path / LABELS_FILE)
        meta = parquet_meta(path / LABELS_FILE)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise ReportError(f"{path}: cannot read its results ({str(e).splitlines()[0]})") from None
    _columns(
        path / "metrics.csv", list(metrics.columns), ("model", "strategy", "f1_micro", "hamming_loss", "roc_auc_micro")
    )
    _columns(path / LABELS_FILE, labels.column_names, ("sample_id", "labels"))
    codes = tuple(meta.get("codes") or [c[3:] for c in metrics.columns if c.startswith("f1/")])
    absent = sorted(set(manifest.models) - set(metrics["model"]))
    if absent:
        raise ReportError(f"{path / 'metrics.csv'}: no rows for model {absent[0]!r} of the manifest")
    _columns(path / "metrics.csv", list(metrics.columns), METRIC_COLUMNS)
    for strategy in pd.unique(metrics["strategy"]):
        if strategy not in REGISTRY:
            raise ReportError(f"{path / 'metrics.csv'}: unknown strategy {strategy!r}")
    for model in manifest.models:
        if not (path / "predictions" / f"{slug(model)}.parquet").is_file():
            raise ReportError(f"{path / 'predictions'}: no predictions of model {model!r}")
    ids = pc.cast(labels.column("sample_id"), pa.string()).combine_chunks()
    true_labels = labels.column("labels").combine_chunks()
    curves = _stored_curves(path) or _curves_from_predictions(
        path, metrics, ids, label_matrix(true_labels, codes), codes
    )
    return Run(path, manifest, metrics, curves, ids, true_labels, codes, _calibrated(path))


CALIBRATED = {"thresholds": ("model", "strategy", "label", "threshold"), "reliability": CURVE_COLUMNS["reliability"]}


def _calibrated(path: Path) -> dict[str, pd.DataFrame]:
    """``RUN/calibration/*.csv`` that ``tokmarg calibrate`` wrote; {} where it was not run."""
    return _csvs(path / "calibration", CALIBRATED) or {}


def _csvs(folder: Path, columns: dict) -> dict[str, pd.DataFrame] | None:
    """``folder/<name>.csv`` for every name of ``columns`` (each checked for its columns); None
    unless all are there."""
    files = {name: folder / f"{name}.csv" for name in columns}
    if not all(f.is_file() for f in files.values()):
        return None
    out = {}
    for name, f in files.items():
        try:
            out[name] = pd.read_csv(f)
        except (OSError, ValueError) as e:
            raise ReportError(f"{f}: cannot read ({str(e).splitlines()[0]})") from None
        _columns(f, list(out[name].columns), tuple(columns[name]))
    return out


def _stored_curves(path: Path) -> dict[str, pd.DataFrame] | None:
    """``RUN/curves/*.csv`` as the reduce wrote them; None for a run reduced before they were."""
    return _csvs(path / CURVES_DIR, CURVE_COLUMNS)


def _curves_from_predictions(
    path: Path, metrics: pd.DataFrame, ids: pa.Array, y_true: np.ndarray, codes: tuple[str, ...]
) -> dict[str, pd.DataFrame]:
    """The curves of a run reduced before they were stored: from its predictions' scores, a model
    at a time (only the score strategies' scores are read)."""
    f1, bins = {}, {}
    for model, g in metrics.groupby("model", sort=False):
        scored = [s for s in g["strategy"] if REGISTRY[s].kind.thresholded]
        f = path / "predictions" / f"{slug(model)}.parquet"
        try:
            table = pq.read_table(
                f, columns=list(SCORE_COLUMNS), filters=[("strategy", "in", scored)] if scored else None
            )
            table = conform(table, ("unsafe", *codes), SCORE_COLUMNS)
            arrays = ModelArrays(str(model), scored, len(ids), ("unsafe", *codes))
            arrays.add(table, positions_of(table.column("sample_id"), ids))
            results = arrays.results()
        except (OSError, ValueError, pa.ArrowException, RecordError) as e:
            raise ReportError(f"{f}: {str(e).splitlines()[0]}") from None
        for s, r in results.items():
            ys = r.code_scores
            if ys is not None:
                f1[model, s], bins[model, s] = score_curves(y_true, ys)
    return curve_frames(f1, bins)


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
        if not run.sample_ids.equals(first.sample_ids) or not run.true_labels.equals(first.true_labels):
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
    y_true = label_matrix(first.true_labels, first.codes)
    curves = {name: pd.concat([r.curves[name] for r in runs], ignore_index=True) for name in CURVE_COLUMNS}
    stored = _stored_tables(first) if len(runs) == 1 else None  # several runs: tables over all their models
    calibrated = {
        name: pd.concat([r.calibrated[name] for r in runs if r.calibrated], ignore_index=True)
        for name in CALIBRATED
        if any(r.calibrated for r in runs)
    }
    return ReportInputs(tuple(runs), first.codes, len(first.sample_ids), y_true, metrics, curves, stored, calibrated)


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
