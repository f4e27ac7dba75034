"""`tokmarg eval`: cut the dataset into partitions, have a launcher score the missing ones,
write each as it finishes, then reduce the run directory (see :mod:`tokmarg.rundir`).

A run is resumable at any point: finished partitions are files, and a run directory is
continued only by the same job (same models, strategies, resolved parameters, samples).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from tokmarg.config import Config, ModelConfig
from tokmarg.data import Dataset
from tokmarg.engine import ENGINES
from tokmarg.engine.score import EngineOptions
from tokmarg.launch import Launcher
from tokmarg.prompts import BUILTIN_FORMATS
from tokmarg.reduce import (
    cross_model_tables,
    finalize_model,
    label_matrix,
    metrics_table,
    model_timing,
    score_matrices,
)
from tokmarg.rundir import (
    FORMAT,
    LABELS_FILE,
    RunDir,
    RunError,
    atomic_write,
    file_sha256,
    now,
    plan,
    slug,
    write_parquet,
)
from tokmarg.worker import Partition, PartitionResult, WorkerSpec

TRANSDUCTIVE_NOTE = "t_opti of the uncertainty strategies is fitted on the evaluated set's own labels (as the paper)"
SPLIT_NOTE = "t_opti of the uncertainty strategies is cross-fitted on 2 held-out halves (seeded)"
DEFAULT_PARTITION_SIZE = 32

__all__ = ["RunError", "RunOptions", "job_of", "run_eval", "slug"]


@dataclass(frozen=True)
class RunOptions:
    engine: EngineOptions = field(default_factory=EngineOptions)
    partition_size: int = DEFAULT_PARTITION_SIZE
    trust_remote_code: bool = False
    allow_pickle: bool = False
    progress: bool = True
    command: str = ""
    args: dict = field(default_factory=dict)  # the CLI's inputs, stored so that --resume can rebuild the job


def versions() -> dict[str, str]:
    pkgs = ("tokmarg", "torch", "transformers", "accelerate", "pandas", "pyarrow", "scikit-learn", "gguf", "ray")
    out = {"python": platform.python_version()}
    for p in pkgs:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def _resolved(mc: ModelConfig) -> dict:
    return {
        "prompt": mc.prompt,
        "taxonomy": mc.taxonomy.name,
        "answer_prefix": mc.answer_prefix,
        "device": mc.device,
        "dtype": mc.dtype,
        "params": {s: vars(p) for s, p in mc.params.items()},
    }


def job_of(cfg: Config, ds: Dataset, opts: RunOptions) -> dict:
    """Everything that decides a run's results; a run directory continues only the same job."""
    ids = "\n".join(s.id for s in ds.samples).encode()
    return {
        "models": [m.name for m in cfg.models],
        "strategies": list(cfg.strategies),
        "semantics": cfg.semantics,
        "calibration": cfg.calibration,
        "seed": cfg.seed,
        "taxonomy": list(cfg.taxonomy.labels),
        "engine": opts.engine.engine,
        "partition_size": opts.partition_size,
        "dataset_sha256": ds.sha256,
        "n_samples": len(ds.samples),
        "sample_ids_sha256": hashlib.sha256(ids).hexdigest(),
        "resolved": {m.name: _resolved(m) for m in cfg.models},
        "prompt_sha256": {m.name: file_sha256(m.prompt) for m in cfg.models if m.prompt not in BUILTIN_FORMATS},
    }


def _partitions(ds: Dataset, size: int) -> list[Partition]:
    return [Partition(i, a, ds.samples[a:b], ds.has_safe) for i, (a, b) in enumerate(plan(len(ds.samples), size))]


def run_eval(
    cfg: Config,
    ds: Dataset,
    out: Path,
    launcher: Launcher,
    opts: RunOptions | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Score the partitions ``out`` lacks, then reduce ``out``; returns (metrics, manifest)."""
    opts = opts or RunOptions()
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if opts.engine.engine not in ENGINES:
        raise RunError(f"--engine {opts.engine.engine!r} is not available; available: {', '.join(ENGINES)}")
    started = now()
    slugs: dict[str, str] = {}
    for m in cfg.models:
        other = slugs.setdefault(slug(m.name), m.name)
        if other != m.name:
            raise RunError(f"--models: {other!r} and {m.name!r} would share the folder {slug(m.name)!r}; rename one")
    rd = RunDir(out)
    stored = rd.stored()
    job = job_of(cfg, ds, opts)
    if stored is not None:
        rd.check_same_job(stored, job)
        rd.lock()
        rd.clean_temporaries()
    parts = _partitions(ds, opts.partition_size)
    done = {m.name: rd.done(m.name, len(parts)) for m in cfg.models}
    work = [(m.name, p) for m in cfg.models for p in parts if p.index not in done[m.name]]
    n_total = len(parts) * len(cfg.models)
    if stored is not None:
        log(f"resuming {out}: {n_total - len(work)} of {n_total} partitions done, {len(work)} to do")
    record = stored or {"format": FORMAT, "args": opts.args, "job": job, "command": opts.command, "created": started}
    try:
        if work:
            launch = _score(cfg, ds, rd, record, parts, done, work, launcher, opts)
        else:  # nothing left to score: keep what the session that scored it recorded
            launch = {**_previous(out).get("launch", {"launcher": launcher.name}), "partitions_run": 0}
        return _reduce(cfg, ds, rd, record, parts, launch, n_total - len(work), started)
    finally:
        rd.unlock()


def _previous(out: Path) -> dict:
    try:
        return json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _score(
    cfg: Config,
    ds: Dataset,
    rd: RunDir,
    record: dict,
    parts: list[Partition],
    done: dict[str, set[int]],
    work: list[tuple[str, Partition]],
    launcher: Launcher,
    opts: RunOptions,
) -> dict:
    todo_models = {m for m, _ in work}
    specs = [
        WorkerSpec.from_config(
            mc, cfg, engine=opts.engine, trust_remote_code=opts.trust_remote_code, allow_pickle=opts.allow_pickle
        )
        for mc in cfg.models
        if mc.name in todo_models
    ]
    sizes = {p.index: len(p.samples) for p in parts}
    progress = Progress(cfg, ds, done, sizes, opts.progress)
    written = 0

    def on_result(res: PartitionResult) -> None:
        nonlocal written
        rd.create(record)  # the first finished partition makes the directory a run
        meta = {
            "model": res.model,
            "index": res.index,
            "seconds": res.seconds,
            "tokens": res.tokens,
            "prefix_tokens": res.prefix_tokens,
            "forward_calls": res.forward_calls,
            "worker": res.worker,
            "finished": now(),
        }
        if rd.write_partition(res.model, res.index, res.rows, meta):
            written += 1
            progress.advance(res.model, sizes[res.index])

    try:
        t0 = time.perf_counter()
        launcher.start(specs)  # Ray: joined or started, dashboard printed, actors sized
        t1 = time.perf_counter()
        launcher.run(work, on_result, progress.state)
        info = {**launcher.info(), "start_seconds": t1 - t0, "run_seconds": time.perf_counter() - t1}
    finally:
        progress.close()
        launcher.close()
    return {**info, "partitions_run": written}


class Progress:
    """Per model, in samples: tqdm bars on a terminal; elsewhere (``ray job logs``, a file) a
    plain line per model at most every ``LINE_EVERY_S`` seconds, not a wall of redraws. A
    model's state (waiting, loading, running, done) shows beside its bar, so the bars tell the
    order in which models ran."""

    LINE_EVERY_S = 15.0

    def __init__(
        self, cfg: Config, ds: Dataset, done: dict[str, set[int]], sizes: dict[int, int], enabled: bool
    ) -> None:
        self.total = len(ds.samples)
        self.count = {m.name: sum(sizes[i] for i in done[m.name]) for m in cfg.models}
        self.tty = enabled and sys.stderr.isatty()
        self.enabled = enabled
        self.t0, self.last = time.monotonic(), dict.fromkeys(self.count, 0.0)
        self.bars = {
            mc.name: tqdm(
                total=self.total,
                initial=self.count[mc.name],
                desc=mc.name[-40:].ljust(40),
                unit="sample",
                position=i,
                leave=True,
                file=sys.stderr,
                mininterval=0.5,
                postfix="waiting",
            )
            for i, mc in enumerate(cfg.models)
        } if self.tty else {}  # fmt: skip

    def advance(self, model: str, n: int) -> None:
        self.count[model] += n
        done = self.count[model]
        if model in self.bars:
            self.bars[model].update(n)
        elif self.enabled and (time.monotonic() - self.last[model] > self.LINE_EVERY_S or done == self.total):
            self.last[model] = time.monotonic()
            self._line(f"{model}: {done}/{self.total} samples ({100 * done / self.total:.0f}%)")

    def state(self, model: str, state: str) -> None:
        if model in self.bars:
            self.bars[model].set_postfix_str(state)
        elif self.enabled:
            self._line(f"{model}: {state}")

    def _line(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f} s] {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        for b in self.bars.values():
            b.close()


def _same_precision(model: str, metas: list[dict], rd: RunDir) -> None:
    """A resumed run must not mix partitions scored at different precisions (e.g. fp32 on a CPU,
    bf16 on a GPU, both from ``--dtype auto``)."""
    kinds = {(m["worker"].get("dtype"), str(m["worker"].get("device", "")).split(":")[0]) for m in metas}
    if len(kinds) > 1:
        seen = ", ".join(f"{d} on {dev}" for d, dev in sorted(kinds, key=str))
        raise RunError(
            f"model {model!r}: partitions were scored at different precisions ({seen}); resume on the same kind "
            f"of device, or delete {rd.path / 'partitions' / slug(model)} to rescore them all"
        )


def _reduce(
    cfg: Config,
    ds: Dataset,
    rd: RunDir,
    record: dict,
    parts: list[Partition],
    launch: dict,
    done_before: int,
    started: str,
) -> tuple[pd.DataFrame, dict]:
    out = rd.path
    expected = [(p.index, [s.id for s in p.samples]) for p in parts]
    frames, timing, thresholds = [], {}, {}
    loads: dict[str, float] = {}  # the first of each model's workers that loaded (some never did: released)
    for w in launch.get("workers", launch.get("actors", [])):
        if w.get("load_seconds") is not None:
            loads.setdefault(w["model"], w["load_seconds"])
    for mc in cfg.models:
        df, metas = rd.read_partitions(mc.name, expected, list(cfg.strategies))
        _same_precision(mc.name, metas, rd)
        thresholds[mc.name] = finalize_model(df, cfg, ds)
        write_parquet(df, out / "predictions" / f"{slug(mc.name)}.parquet")
        frames.append(df)
        timing[mc.name] = {"load_seconds": loads.get(mc.name), **model_timing(metas)}
    pred = pd.concat(frames, ignore_index=True)
    # the truth beside the predictions: a report needs no dataset file (runs may combine across machines)
    labels = pd.DataFrame({"sample_id": [s.id for s in ds.samples], "labels": [list(s.labels) for s in ds.samples]})
    write_parquet(labels, out / LABELS_FILE, {"codes": list(cfg.taxonomy.codes), "dataset_sha256": ds.sha256})
    metrics = metrics_table(pred, cfg, ds)
    # reference: each strategy's own time; fast: the strategies share forwards, so every row
    # shows the time of all of them together
    n = max(1, len(ds.samples))
    metrics["seconds_per_sample"] = [
        timing[m]["seconds"].get(s, timing[m]["seconds"].get("all", float("nan"))) / n
        for m, s in zip(metrics.model, metrics.strategy)
    ]
    atomic_write(out / "metrics.csv", metrics.to_csv(index=False).encode())
    codes = list(cfg.taxonomy.codes)
    scores = score_matrices(pred, list(labels["sample_id"]), codes)
    tables = cross_model_tables(metrics, scores, label_matrix((s.labels for s in ds.samples), codes))
    for name, t in tables.items():
        atomic_write(out / "tables" / f"{name}.csv", t.to_csv(index=False).encode())
    job = record["job"]
    manifest = {
        "command": record.get("command", ""),
        "models": job["models"],
        "strategies": job["strategies"],
        "semantics": job["semantics"],
        "engine": job["engine"],
        "calibration": cfg.calibration,
        "calibration_note": TRANSDUCTIVE_NOTE if cfg.calibration == "transductive" else SPLIT_NOTE,
        "t_opti": thresholds,
        "params_file": cfg.path,
        # where params and dataset came from: the command line, the working directory, or the
        # defaults packaged with tokmarg (no --params / --dataset, none in the working directory)
        "inputs_from": record.get("args", {}).get("inputs_from"),
        "params": cfg.raw,
        "resolved": job["resolved"],
        "taxonomy": cfg.taxonomy.name,
        "dataset": ds.path,
        "dataset_sha256": ds.sha256,
        "n_samples": len(ds.samples),
        "n_skipped": ds.n_skipped,
        "skipped": list(ds.skipped),
        "partition_size": job["partition_size"],
        "partitions": {"per_model": len(parts), "done_before_this_session": done_before},
        "launch": launch,
        "timing": timing,
        "tokens_forwarded": {m: int(g.sum()) for m, g in pred.groupby("model")["tokens_forwarded"]},
        "tables": sorted(f"tables/{n}.csv" for n in tables),
        "versions": versions(),
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count()},
        "started": record.get("created", started),
        "finished": now(),
    }
    atomic_write(out / "manifest.json", (json.dumps(manifest, indent=2, default=str) + "\n").encode())
    return metrics, manifest
