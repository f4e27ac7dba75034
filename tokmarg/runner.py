"""`tokmarg eval`: cut the dataset into partitions, have a launcher score the missing ones,
write each as it finishes, then reduce the run directory (see :mod:`tokmarg.rundir`).

A run is resumable at any point: finished partitions are files, and a run directory is
continued only by the same job (same models, strategies, resolved parameters, samples).
:func:`evaluate` is the whole of ``tokmarg eval`` for one :class:`~tokmarg.settings.EvalSettings`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tokmarg import scanindex
from tokmarg.config import Config, ModelConfig, build_config
from tokmarg.data import Dataset, load_dataset
from tokmarg.launch import Launcher, make_launcher
from tokmarg.progress import Progress
from tokmarg.prompts import BUILTIN_FORMATS
from tokmarg.records import Manifest, PartitionResult
from tokmarg.reduce import reduce_run
from tokmarg.rundir import (
    FORMAT,
    PartitionWriter,
    RunDir,
    RunError,
    file_sha256,
    ids_sha256,
    now,
    plan,
    slug,
    write_table,
)  # fmt: skip
from tokmarg.settings import EvalSettings
from tokmarg.worker import Partition, WorkerSpec

__all__ = ["RunError", "evaluate", "job_of", "run_eval", "slug"]

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_inputs(settings: EvalSettings) -> tuple[Config, Dataset]:
    """The validated params and the dataset the settings name."""
    s = settings
    cfg = build_config(s.params, s.models, s.strategies, s.semantics, s.device, s.dtype)
    return cfg, read_dataset(s, cfg)


def read_dataset(settings: EvalSettings, cfg: Config, labeled: bool = True) -> Dataset:
    """The dataset file the settings name, read as the config says (a resume reads the scan it kept)."""
    s = settings
    return load_dataset(
        s.dataset,
        cfg.taxonomy,
        skip_invalid=s.skip_invalid,
        limit=s.limit,
        fmt=s.format,
        columns=cfg.dataset,
        index=s.out / scanindex.INDEX_FILE,  # same file, same arguments
        labeled=labeled,
    )


def evaluate(settings: EvalSettings, log: Log = _stderr) -> tuple[pd.DataFrame, Manifest]:
    """``tokmarg eval``: load the inputs, score what the run directory lacks, reduce it."""
    cfg, ds = load_inputs(settings)
    return run_eval(cfg, ds, settings, make_launcher(settings.launch), log)


def _resolved(mc: ModelConfig) -> dict:
    return {
        "prompt": mc.prompt,
        "taxonomy": mc.taxonomy.name,
        **({"exclude_codes": list(mc.exclude_codes)} if mc.exclude_codes else {}),  # older runs: none
        "answer_prefix": mc.answer_prefix,
        "device": mc.device,
        "dtype": mc.dtype,
        "params": {s: vars(p) for s, p in mc.params.items()},
    }


# How prompts are rendered (tokmarg.chat): 2 since content shapes and policies are read from each
# chat template. A run made under another version (older guard prompts could differ) is not resumed.
PROMPTING = 2


def job_of(cfg: Config, ds: Dataset, settings: EvalSettings) -> dict:
    """Everything that decides a run's results; a run directory continues only the same job."""
    return {
        "prompting": PROMPTING,
        "models": [m.name for m in cfg.models],
        "strategies": list(cfg.strategies),
        "semantics": cfg.semantics,
        "calibration": cfg.calibration,
        "seed": cfg.seed,
        "taxonomy": list(cfg.taxonomy.labels),
        "engine": settings.engine.engine,
        "partition_size": settings.partition_size,
        "dataset_sha256": ds.sha256,
        "n_samples": len(ds),
        "sample_ids_sha256": ids_sha256(ds.ids),
        "resolved": {m.name: _resolved(m) for m in cfg.models},
        "prompt_sha256": {m.name: file_sha256(m.prompt) for m in cfg.models if m.prompt not in BUILTIN_FORMATS},
        # how the dataset file was read, where not the default (older runs have neither key)
        **({"dataset_format": settings.format} if settings.format else {}),
        **({"dataset_columns": cfg.raw["dataset"]} if not cfg.dataset.empty else {}),
    }


def _partitions(ds: Dataset, size: int, has_safe: bool | None = None) -> list[Partition]:
    has_safe = ds.has_safe if has_safe is None else has_safe
    return [Partition(i, a, b, has_safe, ds) for i, (a, b) in enumerate(plan(len(ds), size))]


def _check_folders(cfg: Config) -> None:
    slugs: dict[str, str] = {}
    for m in cfg.models:
        other = slugs.setdefault(slug(m.name), m.name)
        if other != m.name:
            raise RunError(f"--models: {other!r} and {m.name!r} would share the folder {slug(m.name)!r}; rename one")


@dataclass(frozen=True)
class Scored:
    """A run directory whose partitions are all scored (the run's lock held)."""

    rd: RunDir
    record: dict
    parts: list[Partition]
    launch: dict
    n_done_before: int  # partitions finished before this session
    started: str


@contextmanager
def scored_run(
    cfg: Config,
    ds: Dataset,
    settings: EvalSettings,
    launcher: Launcher,
    log: Log = _stderr,
    *,
    job: dict | None = None,
    extra: dict | None = None,
    has_safe: bool | None = None,
    expect: dict | None = None,
) -> Iterator[Scored]:
    """Score the partitions ``settings.out`` lacks; yields the finished run (locked until the block
    ends). ``job``: what a resume must match (default :func:`job_of`); ``extra``: more of
    ``run.json``; ``has_safe``: the partitions' (default: the dataset has safe rows); ``expect``:
    the identity each worker checks at load (a policy's)."""
    started = now()
    _check_folders(cfg)
    out = settings.out
    rd = RunDir(out)
    stored = rd.stored()
    job = job_of(cfg, ds, settings) if job is None else job
    if stored is not None:
        rd.check_same_job(stored, job)
        rd.lock()
        rd.clean_temporaries()
    parts = _partitions(ds, settings.partition_size, has_safe)
    done = {m.name: rd.done(m.name, len(parts)) for m in cfg.models}
    work = [(m.name, p) for m in cfg.models for p in parts if p.index not in done[m.name]]
    n_total = len(parts) * len(cfg.models)
    if stored is not None:
        log(f"resuming {out}: {n_total - len(work)} of {n_total} partitions done, {len(work)} to do")
    record = stored or {
        "format": FORMAT,
        "args": settings.record(),
        "job": job,
        "command": settings.command,
        "created": started,
        **(extra or {}),
    }
    try:
        if work:
            launch = _score(cfg, ds, rd, record, parts, done, work, launcher, settings, expect)
        else:  # nothing left to score: keep what the session that scored it recorded
            launch = {**_previous_launch(out, launcher.name), "partitions_run": 0}
        if not ds.indexed and ds.key is not None:  # the scan, kept for a resume
            table, meta = scanindex.table(ds.index())
            write_table(table, out / scanindex.INDEX_FILE, meta)
        yield Scored(rd, record, parts, launch, n_total - len(work), started)
    finally:
        rd.unlock()


def run_eval(
    cfg: Config, ds: Dataset, settings: EvalSettings, launcher: Launcher, log: Log = _stderr
) -> tuple[pd.DataFrame, Manifest]:
    """Score the partitions ``settings.out`` lacks, then reduce it; returns (metrics, manifest)."""
    with scored_run(cfg, ds, settings, launcher, log) as run:
        return reduce_run(cfg, ds, run.rd, run.record, run.parts, run.launch, run.n_done_before, run.started)


def _previous_launch(out: Path, launcher: str) -> dict:
    """What the session that scored the run recorded about its launch."""
    try:
        return Manifest.from_dict(json.loads((out / "manifest.json").read_text(encoding="utf-8"))).launch
    except (OSError, ValueError):
        return {"launcher": launcher}


def _score(
    cfg: Config,
    ds: Dataset,
    rd: RunDir,
    record: dict,
    parts: list[Partition],
    done: dict[str, set[int]],
    work: list[tuple[str, Partition]],
    launcher: Launcher,
    settings: EvalSettings,
    expect: dict | None = None,
) -> dict:
    todo_models = {m for m, _ in work}
    probes = ds.probes  # each worker renders one sample per conversation shape at load
    specs = [
        WorkerSpec.from_config(
            mc,
            cfg,
            engine=settings.engine,
            trust_remote_code=settings.trust_remote_code,
            allow_pickle=settings.allow_pickle,
            probes=probes,
            expect=expect,
        )
        for mc in cfg.models
        if mc.name in todo_models
    ]
    sizes = {p.index: p.stop - p.start for p in parts}
    progress = Progress(cfg, ds, done, sizes, settings.progress)
    writer = PartitionWriter(rd, cfg.taxonomy.labels)
    seen: set[tuple[str, int]] = set()

    def on_result(res: PartitionResult) -> None:
        rd.create(record)  # the first finished partition makes the directory a run
        writer.add(dataclasses.replace(res, meta=dataclasses.replace(res.meta, finished=now())))
        if (res.model, res.index) not in seen:  # a retried partition counts once
            seen.add((res.model, res.index))
            progress.advance(res.model, sizes[res.index])

    try:
        t0 = time.perf_counter()
        launcher.start(specs)  # Ray: joined or started, dashboard printed, actors sized
        t1 = time.perf_counter()
        launcher.run(work, on_result, progress.state)
        info = {**launcher.info(), "start_seconds": t1 - t0, "run_seconds": time.perf_counter() - t1}
    finally:
        writer.flush()  # what finished is kept, also when the run stops on an error
        progress.close()
        launcher.close()
    return {**info, "partitions_run": writer.written}
