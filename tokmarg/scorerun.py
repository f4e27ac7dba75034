"""`tokmarg score`: apply a policy to a dataset (labels not needed) on the launcher `eval` uses.

The policy's model scores the rows with the policy's strategy only (waves, replicas,
partitions, resume and progress as in ``eval``); the worker refuses a model or prompt whose
fingerprint is not the policy's before anything is written. Then the partitions are read back in
dataset order, a partition file at a time, and written, streamed::

    OUT/scores.parquet     id, flagged, categories, category_scores, unsafe_score, raw_scores, unexplored_mass
    OUT/scores.jsonl       one OpenAI-moderation-shaped object per row: id, flagged, categories, category_scores
    OUT/evaluation.csv     with --evaluate: the policy's rates on these rows (and on the policy's
                           held-out rows, when this is the dataset it was fitted on)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from tokmarg.columns import score_matrix
from tokmarg.config import load_params
from tokmarg.data import Dataset
from tokmarg.launch import make_launcher
from tokmarg.policy.apply import Applied, apply_policy, moderation_lines, score_schema, score_table
from tokmarg.policy.file import Policy, PolicyError, read_policy
from tokmarg.policy.fit import held_out_rows
from tokmarg.policy.setup import expected_identity, policy_config
from tokmarg.policy.tally import Tally
from tokmarg.records import conform
from tokmarg.rundir import RunDir, atomic_file, atomic_write, file_sha256, ids_sha256, parquet_writer
from tokmarg.runner import job_of, read_dataset, scored_run
from tokmarg.settings import EvalSettings
from tokmarg.worker import Partition

SCORES = "scores.parquet"
JSONL = "scores.jsonl"
EVALUATION = "evaluation.csv"
BATCH_ROWS = 8192  # rows per written batch (a Parquet row group)
READ = ("sample_id", "scores", "unexplored_mass")

Log = Callable[[str], None]


@dataclass(frozen=True)
class ScoreJob:
    """What ``tokmarg score`` was asked beyond the launch settings."""

    policy: Path
    evaluate: bool = False
    params: Path | None = None  # --params: what the policy leaves unsaid


@dataclass(frozen=True)
class ScoreSummary:
    out: Path
    rows: int
    flagged: int
    evaluation: pd.DataFrame | None


def score_settings(
    options: dict, policy: Path | None, params: Path | None, evaluate: bool, extra: list[str], command: str
) -> tuple[ScoreJob, EvalSettings]:
    """The command line of ``tokmarg score`` as a job and launch settings; with ``--resume`` the
    directory's own (``run.json``)."""
    from tokmarg.settings import SettingsError, from_options

    resume = options.get("resume")
    if resume is not None:
        if policy is not None or params is not None or evaluate:
            raise SettingsError(f"--resume takes the policy and options from {Path(resume) / 'run.json'}; drop them")
        try:
            sc = json.loads((Path(resume) / "run.json").read_text(encoding="utf-8"))["score"]
            job = ScoreJob(Path(sc["policy"]), bool(sc["evaluate"]), Path(sc["params"]) if sc["params"] else None)
        except (OSError, ValueError, KeyError, TypeError):
            raise SettingsError(f"--resume {resume}: not a directory of `tokmarg score` (no run.json)") from None
        return job, from_options(options, extra, command)
    if policy is None:
        raise SettingsError("--policy: required (a policy file written by `tokmarg calibrate`)")
    if options.get("dataset") is None:
        raise SettingsError("--dataset: required (the rows to score)")
    pol = read_policy(policy)
    opts = dict(options)
    if opts.get("partition_size") is None:  # the fitted run's: the same rows meet in the same batches
        opts["partition_size"] = pol.dataset.get("partition_size")
    opts["params"] = params or policy  # recorded; the config itself is the policy's (see policy_config)
    settings = from_options(opts, extra, command)
    if settings.models is not None and len(settings.models) > 1:
        raise SettingsError(f"--models: a policy scores with one model, not {len(settings.models)}")
    return ScoreJob(Path(policy), evaluate, params), settings


def score(job: ScoreJob, settings: EvalSettings, log: Log = lambda m: print(m, file=sys.stderr)) -> ScoreSummary:
    """``tokmarg score``: the policy's verdicts on every row of ``settings.dataset``."""
    policy = read_policy(job.policy)
    model = (settings.models or (policy.model["id"],))[0]
    user = load_params(job.params) if job.params else {}
    cfg = policy_config(policy, job.policy, model, job.params, user, settings.device, settings.dtype)
    ds = read_dataset(settings, cfg, labeled=job.evaluate)
    settings = replace(settings, models=(model,), strategies=(policy.strategy["name"],))
    jobd = {**job_of(cfg, ds, settings), "policy_sha256": file_sha256(job.policy), "evaluate": job.evaluate}
    extra = {
        "score": {
            "policy": str(Path(job.policy).resolve()),
            "params": str(Path(job.params).resolve()) if job.params else "",
            "evaluate": job.evaluate,
        }
    }
    decide = bool(policy.strategy.get("decide_safe", True))
    launcher = make_launcher(settings.launch)
    expect = expected_identity(policy, job.policy)
    with scored_run(cfg, ds, settings, launcher, log, job=jobd, extra=extra, has_safe=decide, expect=expect) as run:
        return _write(policy, ds, run.rd, run.parts, model, settings.out, job.evaluate)


def _partition_rows(
    rd: RunDir, model: str, strategy: str, parts: list[Partition], labels: tuple[str, ...]
) -> Iterator[pa.Table]:
    """Each partition's rows of ``strategy``, in dataset order, a partition file decoded at a time."""
    where: dict[int, tuple[Path, int]] = {}
    sizes = {p.index: p.stop - p.start for p in parts}
    files = {}
    for path in rd.partition_files(model):
        f, metas = rd.open_partition_file(path)
        files[path] = f
        at = 0
        for m in metas:
            where[m.index] = (path, at)
            at += sizes[m.index]
    current: tuple[Path | None, pa.Table | None] = (None, None)
    for p in parts:
        path, at = where[p.index]
        if current[0] != path:
            current = (path, conform(files[path].read(READ, strategy), labels, READ))
        yield current[1].slice(at, sizes[p.index])


def _write(
    policy: Policy, ds: Dataset, rd: RunDir, parts: list[Partition], model: str, out: Path, evaluate: bool
) -> ScoreSummary:
    labels = ("unsafe", *ds.codes)
    if tuple(policy.labels) != labels:
        raise PolicyError(f"{out}: the run's labels are not the policy's verdicts")
    tallies = _tallies(policy, ds) if evaluate else {}
    flagged = at = 0
    with parquet_writer(out / SCORES, score_schema(policy)) as pw, atomic_file(out / JSONL) as jf:
        for batch in _batches(_partition_rows(rd, model, policy.strategy["name"], parts, labels)):
            rows = np.arange(at, at + batch.num_rows)
            if not batch.column("sample_id").combine_chunks().equals(ds.ids.slice(at, batch.num_rows)):
                raise PolicyError(f"{rd.path}: the partitions of {model} do not hold the dataset's rows in order")
            at += batch.num_rows
            raw = score_matrix(batch.column("scores"), labels)
            unexplored = batch.column("unexplored_mass").to_numpy(zero_copy_only=False).astype(np.float64)
            applied = apply_policy(policy, raw)
            table = score_table(policy, batch.column("sample_id"), raw, unexplored, applied)
            pw.write_table(table)
            jf.writelines(moderation_lines(table))
            flagged += int(applied.flagged.sum())
            if tallies:
                y = np.column_stack([ds.labels[rows].any(axis=1), ds.labels[rows]])
                for tally, member in tallies.values():
                    keep = member[rows]
                    if keep.any():
                        tally.add(raw[keep], y[keep], _take(applied, keep))
    if at != len(ds):
        raise PolicyError(f"{rd.path}: the partitions of {model} hold {at} rows, not the dataset's {len(ds)}")
    evaluation = _evaluation(tallies) if tallies else None
    if evaluation is not None:
        atomic_write(out / EVALUATION, evaluation.to_csv(index=False).encode())
    return ScoreSummary(out, len(ds), flagged, evaluation)


def _batches(tables: Iterator[pa.Table]) -> Iterator[pa.Table]:
    """The partitions' rows regrouped into batches of at least :data:`BATCH_ROWS` (the last: the rest)."""
    buf: list[pa.Table] = []
    n = 0
    for t in tables:
        buf.append(t)
        n += t.num_rows
        if n >= BATCH_ROWS:
            yield pa.concat_tables(buf).combine_chunks()
            buf, n = [], 0
    if buf:
        yield pa.concat_tables(buf).combine_chunks()


def _take(a: Applied, keep: np.ndarray) -> Applied:
    return Applied(a.calibrated[keep], a.flags[keep], a.flagged[keep])


def _tallies(policy: Policy, ds: Dataset) -> dict[str, tuple[Tally, np.ndarray]]:
    """Every row; and, where ``ds`` holds the very rows the policy was fitted on (same file, same
    sample ids: not another --limit or --skip-invalid), its held-out rows."""
    t = float((policy.strategy.get("params") or {}).get("threshold", 0.5))
    out = {"all": (Tally(policy.labels, t), np.ones(len(ds), dtype=bool))}
    if ds.sha256 == policy.dataset["sha256"] and ids_sha256(ds.ids) == policy.dataset.get("sample_ids_sha256"):
        c = policy.calibration
        held = held_out_rows(ds.ids.to_pylist(), int(c["seed"]), int(c["folds"]))
        out["held_out"] = (Tally(policy.labels, t), held)
    return out


def _evaluation(tallies: dict[str, tuple[Tally, np.ndarray]]) -> pd.DataFrame:
    """One row per (subset of rows, verdict or total): the policy file's ``held_out`` keys."""
    rows = []
    for name, (tally, _) in tallies.items():
        for label, r in {**tally.verdicts(), **tally.totals()}.items():
            rows.append({"subset": name, "label": label, **r})
    return pd.DataFrame(rows)
