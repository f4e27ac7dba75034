"""`tokmarg calibrate`: fit per-code calibration maps and thresholds on a finished labeled run,
write one policy file per model x score strategy, and the tables the report shows.

Reads ``RUN/manifest.json``, ``RUN/labels.parquet``, ``RUN/predictions/<model>.parquet`` (the
score strategies' scores, one model x strategy at a time) and the partitions' metadata (which model
files and rendered prompt scored them). Everything is computed before anything is written. Writes::

    RUN/policies/<model>__<strategy>.yaml        (or --out, for one model x strategy)
    RUN/calibration/thresholds.csv               per model x strategy x verdict: threshold, rates
    RUN/calibration/reliability.csv              held-out reliability bins, before and after
    RUN/calibration/held_out/<model>__<strategy>.parquet   the held-out rows' calibrated scores
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tokmarg import __version__
from tokmarg.choices import CalibrationMethod, choose
from tokmarg.columns import SCORE_COLUMNS, ModelArrays, label_matrix, positions_of
from tokmarg.metrics import calibration_bins
from tokmarg.policy.apply import apply_policy, score_table
from tokmarg.policy.file import FLAGGED_RULE, Policy, PolicyError, Verdict
from tokmarg.policy.fit import FitSpec, StrategyFit, fit_strategy, held_out_rows
from tokmarg.policy.objective import Objective
from tokmarg.records import Manifest, RecordError, conform
from tokmarg.reduce import RELIABILITY, curve_frames
from tokmarg.rundir import LABELS_FILE, RunDir, atomic_write, ids_sha256, now, parquet_meta, slug, write_table
from tokmarg.strategies import REGISTRY

CAL_DIR = "calibration"
POLICY_DIR = "policies"
THRESHOLDS = "thresholds.csv"
RELIABILITY_CSV = "reliability.csv"
HELD_OUT_DIR = "held_out"
KEYS = ("model", "strategy")

Log = Callable[[str], None]


@dataclass(frozen=True)
class CalibrateOptions:
    models: tuple[str, ...] = ()  # () every model of the run
    strategies: tuple[str, ...] = ()  # () every score strategy of the run
    method: str = "isotonic"
    objective: str = "f1"
    out: Path | None = None  # the policy file, for one model x strategy
    folds: int = 5
    seed: int | None = None  # None: the run's seed
    min_positives: int = 10


@dataclass(frozen=True)
class LabeledRun:
    """What calibrate reads of a finished run besides its predictions."""

    path: Path
    manifest: Manifest
    codes: tuple[str, ...]
    sample_ids: pa.Array  # (n,) string
    y_true: np.ndarray  # (n, len(codes)) bool


def read_run(path: Path) -> LabeledRun:
    """The manifest, sample ids and true labels of a finished run; PolicyError in one line."""
    from tokmarg.report.inputs import ReportError, _manifest  # the one reader of a finished run's manifest

    try:
        manifest = _manifest(path)
    except ReportError as e:
        raise PolicyError(str(e)) from None
    try:
        labels = pq.read_table(path / LABELS_FILE, columns=["sample_id", "labels"])
        codes = tuple(parquet_meta(path / LABELS_FILE).get("codes") or ())
    except (OSError, ValueError, KeyError, pa.ArrowException) as e:
        raise PolicyError(f"{path / LABELS_FILE}: cannot read ({str(e).splitlines()[0]})") from None
    if not codes:
        raise PolicyError(f"{path / LABELS_FILE}: names no codes (a run reduced by an older tokmarg?)")
    ids = labels.column("sample_id").cast(pa.string()).combine_chunks()
    return LabeledRun(path, manifest, codes, ids, label_matrix(labels.column("labels"), codes))


def _pairs(run: LabeledRun, opts: CalibrateOptions) -> list[tuple[str, str]]:
    m = run.manifest
    models = list(opts.models) or list(m.models)
    for name in models:
        if name not in m.models:
            raise PolicyError(f"--models: {name!r} is not a model of {run.path} ({', '.join(m.models)})")
    scored = [s for s in m.strategies if REGISTRY[s].kind.thresholded]
    strategies = list(opts.strategies) or scored
    for s in strategies:
        if s not in m.strategies:
            raise PolicyError(f"--strategies: {s!r} was not run in {run.path} ({', '.join(m.strategies)})")
        if s not in scored:
            raise PolicyError(
                f"--strategies: {s!r} gives no scores to calibrate; score strategies of the run: {', '.join(scored)}"
            )
    if not strategies:
        raise PolicyError(f"{run.path}: no score strategy was run; calibrate fits {', '.join(scored) or 'none'}")
    return [(mo, s) for mo in models for s in strategies]


def model_identity(run: LabeledRun, model: str) -> dict:
    """The model files' fingerprint, the rendered prompt's hash and the dtype its partitions were
    scored with; PolicyError where they are not recorded or not one."""
    rd = RunDir(run.path)
    seen: dict[str, set] = {"model_sha256": set(), "prompt_sha256": set(), "dtype": set()}
    files: dict = {}
    for f in rd.partition_files(model):
        _, metas = rd.open_partition_file(f)
        for meta in metas:
            w = meta.worker
            if "model_sha256" not in w or "prompt_sha256" not in w:
                raise PolicyError(
                    f"{f}: records no fingerprint of the model or prompt that scored it (scored by an older "
                    "tokmarg); score the dataset again into a new run directory to calibrate it"
                )
            for k in seen:
                seen[k].add(str(w.get(k)))
    for k, values in seen.items():
        if len(values) > 1:
            raise PolicyError(f"{run.path}: model {model!r}: its partitions were scored with {len(values)} {k}s")
    if not seen["model_sha256"]:
        raise PolicyError(f"{run.path}: model {model!r} has no partition files")
    for w in run.manifest.launch.get("workers") or []:  # each file's hash, as the launch recorded it
        if w.get("model") == model and w.get("model_sha256") in seen["model_sha256"]:
            files = w.get("model_files") or files
    return {k: next(iter(v)) for k, v in seen.items()} | {"model_files": files}


def _scores(run: LabeledRun, model: str, strategy: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(n, len(codes)) code scores and (n,) unsafe scores of one model x strategy (no score = 0)."""
    f = run.path / "predictions" / f"{slug(model)}.parquet"
    labels = ("unsafe", *run.codes)
    try:
        table = pq.read_table(f, columns=list(SCORE_COLUMNS), filters=[("strategy", "==", strategy)])
        table = conform(table, labels, SCORE_COLUMNS)
        arrays = ModelArrays(model, [strategy], len(run.sample_ids), labels)
        arrays.add(table, positions_of(table.column("sample_id"), run.sample_ids))
        r = arrays.results()[strategy]
    except (OSError, ValueError, pa.ArrowException, RecordError) as e:
        raise PolicyError(f"{f}: {str(e).splitlines()[0]}") from None
    if r.code_scores is None:
        raise PolicyError(f"{f}: {model} / {strategy} has no scores")
    return r.code_scores, r.unsafe_score


@dataclass
class Fitted:
    model: str
    strategy: str
    policy: Policy
    fit: StrategyFit
    held: np.ndarray  # (n,) bool
    raw: np.ndarray  # (m, len(labels)) the held-out rows' raw scores
    y: np.ndarray  # (m, len(labels)) their labels


def _fit_one(
    run: LabeledRun, model: str, strategy: str, ident: dict, opts: CalibrateOptions, seed: int, held: np.ndarray
) -> Fitted:
    """One model x strategy's policy, fitted on the rows not ``held`` (n,) bool."""
    m = run.manifest
    codes, unsafe = _scores(run, model, strategy)
    labels = ["unsafe", *run.codes]
    raw = np.column_stack([unsafe if unsafe is not None else np.zeros(len(codes)), codes])
    y = np.column_stack([run.y_true.any(axis=1), run.y_true])
    resolved = m.resolved.get(model, {})
    params = resolved.get("params", {}).get(strategy, {})
    objective = Objective.parse(opts.objective)
    spec = FitSpec(opts.method, objective, opts.min_positives, params.get("threshold", 0.5))
    fit = fit_strategy(labels, raw, y, held, spec)
    verdicts = tuple(
        Verdict(f.label, f.map, f.threshold, f.fitted, f.note, f.objective_met, f.fit, f.held_out) for f in fit.verdicts
    )
    policy = Policy(
        header={"tokmarg_version": __version__, "created": now(), "run": str(run.path.resolve())},
        model={"id": model, "sha256": ident["model_sha256"], "files": ident["model_files"], "dtype": ident["dtype"]},
        prompt={
            "format": resolved.get("prompt", ""),
            "taxonomy": resolved.get("taxonomy", m.taxonomy),
            "sha256": ident["prompt_sha256"],
            "answer_prefix": resolved.get("answer_prefix", ""),
        },
        taxonomy={"name": m.taxonomy, "codes": list(run.codes), "excluded": list(m.exclude_codes)},
        strategy={
            "name": strategy,
            "semantics": m.semantics,
            "params": params,
            "decide_safe": bool((~run.y_true.any(axis=1)).any()),  # as the run: the data had safe rows
        },
        calibration={
            "method": str(opts.method),
            "objective": str(objective),
            "folds": opts.folds,
            "held_out_rule": "rows whose sha256 of <seed>:<sample_id> is 0 modulo folds",
            "seed": seed,
            "min_positives": opts.min_positives,
        },
        dataset={
            "sha256": m.dataset_sha256,
            "path": m.dataset,
            "rows": len(held),
            "fit_rows": int((~held).sum()),
            "held_out_rows": int(held.sum()),
            "sample_ids_sha256": ids_sha256(run.sample_ids),  # which rows: `score --evaluate` finds them
            "partition_size": m.partition_size,  # `score` partitions alike: the same rows in the same batches
        },
        verdicts=verdicts,
        flagged={"rule": FLAGGED_RULE, "held_out": fit.summary["flagged"]},
        summary={k: v for k, v in fit.summary.items() if k != "flagged"},
    )
    return Fitted(model, strategy, policy, fit, held, raw[held], y[held])


def _threshold_rows(f: Fitted, policy_path: Path) -> pd.DataFrame:
    rows = []
    for v in f.policy.verdicts:
        rows.append(
            {
                "model": f.model,
                "strategy": f.strategy,
                "label": v.label,
                "fitted": v.fitted,
                "map": v.map.kind,
                "threshold": v.threshold,
                "objective": f.policy.calibration["objective"],
                "objective_met": v.objective_met,
                **{f"fit_{k}": v.fit[k] for k in ("precision", "recall", "f1", "fpr")},
                **v.held_out,
                "note": v.note,
                "policy": str(policy_path),
            }
        )
    for name, rates in (("flagged", f.policy.flagged["held_out"]), *f.policy.summary.items()):
        rows.append({"model": f.model, "strategy": f.strategy, "label": name, **rates, "policy": str(policy_path)})
    return pd.DataFrame(rows)


def _reliability_rows(f: Fitted) -> pd.DataFrame:
    """Held-out reliability bins of the codes' scores (every (sample, code) pair), raw and calibrated."""
    frames = []
    for when, s in (("before", f.raw[:, 1:]), ("after", f.fit.held_scores[:, 1:])):
        bins = calibration_bins(f.y[:, 1:], s)
        frames.append(curve_frames({}, {(f.model, f.strategy): bins})[RELIABILITY].assign(when=when))
    return pd.concat(frames, ignore_index=True)


def _held_out_table(run: LabeledRun, f: Fitted) -> pa.Table:
    """The held-out rows as ``score`` writes them (no unexplored mass: the predictions' is not read)."""
    ids = run.sample_ids.filter(pa.array(f.held))
    return score_table(f.policy, ids, f.raw, np.full(len(f.raw), np.nan), apply_policy(f.policy, f.raw))


def _merge_csv(path: Path, new: pd.DataFrame) -> bytes:
    """``path``'s rows of other model x strategy pairs, then ``new``'s, as CSV."""
    if path.is_file():
        try:
            old = pd.read_csv(path)
        except (OSError, ValueError) as e:
            raise PolicyError(f"{path}: cannot read ({str(e).splitlines()[0]})") from None
        if all(k in old.columns for k in KEYS):
            done = set(map(tuple, new[list(KEYS)].drop_duplicates().to_numpy()))
            old = old[[tuple(r) not in done for r in old[list(KEYS)].to_numpy()]]
            new = pd.concat([old, new], ignore_index=True)
    return new.to_csv(index=False).encode()


def calibrate_run(path: Path, opts: CalibrateOptions, log: Log = lambda m: print(m, file=sys.stderr)) -> list[Fitted]:
    """``tokmarg calibrate``: fit every selected model x score strategy of the run at ``path``,
    then write the policies and tables (nothing is written when any fit fails)."""
    opts = CalibrateOptions(**{**vars(opts), "method": choose(CalibrationMethod, opts.method, "--method", PolicyError)})
    Objective.parse(opts.objective)  # a bad objective fails before anything is read
    if opts.folds < 2:
        raise PolicyError(f"--folds: {opts.folds}: needs at least 2 (one held out, the others fit)")
    run = read_run(path)
    pairs = _pairs(run, opts)
    if opts.out is not None and len(pairs) > 1:
        raise PolicyError(
            f"--out {opts.out}: names one policy file, but {len(pairs)} model x strategy pairs are selected; "
            "pick one with --models and --strategies, or leave --out out (RUN/policies/)"
        )
    seed = int(run.manifest.params.get("seed", 0)) if opts.seed is None else opts.seed
    idents = {m: model_identity(run, m) for m in dict.fromkeys(m for m, _ in pairs)}
    held = held_out_rows(run.sample_ids.to_pylist(), seed, opts.folds)
    if not held.any() or held.all():
        raise PolicyError(
            f"--folds {opts.folds}: {run.path}'s {len(held)} rows leave {'no' if not held.any() else 'only'} "
            "held-out rows; use fewer folds or more rows"
        )
    fitted = []
    for model, strategy in pairs:
        log(f"calibrate: {model} / {strategy}")
        fitted.append(_fit_one(run, model, strategy, idents[model], opts, seed, held))
    _write(run, fitted, opts)
    return fitted


def policy_path(run_path: Path, f: Fitted, opts: CalibrateOptions) -> Path:
    return opts.out or run_path / POLICY_DIR / f"{slug(f.model)}__{slug(f.strategy)}.yaml"


def _write(run: LabeledRun, fitted: list[Fitted], opts: CalibrateOptions) -> None:
    cal = run.path / CAL_DIR
    thresholds = pd.concat([_threshold_rows(f, policy_path(run.path, f, opts)) for f in fitted], ignore_index=True)
    reliability = pd.concat([_reliability_rows(f) for f in fitted], ignore_index=True)
    csvs = {cal / THRESHOLDS: _merge_csv(cal / THRESHOLDS, thresholds)}
    csvs[cal / RELIABILITY_CSV] = _merge_csv(cal / RELIABILITY_CSV, reliability)
    for f in fitted:
        atomic_write(policy_path(run.path, f, opts), f.policy.to_yaml().encode())
        write_table(_held_out_table(run, f), cal / HELD_OUT_DIR / f"{slug(f.model)}__{slug(f.strategy)}.parquet")
    for p, data in csvs.items():
        atomic_write(p, data)
