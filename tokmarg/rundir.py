"""The run directory: what a run is, which partitions are done, atomic writes.

Layout (SPEC §6)::

    RUN/run.json                                  the job: inputs, settings and fingerprints
    RUN/partitions/<model>/part-00003.parquet     one per model x partition, written atomically
    RUN/predictions/<model>.parquet               reduced, after the uncertainty step
    RUN/metrics.csv, RUN/tables/*.csv             metrics and cross-model tables
    RUN/manifest.json                             written last: the run is complete

A partition is done when its file exists: files are written under a temporary name and
renamed, so a file is never half there, and a partition that was computed twice is
written once. ``run.json`` appears with the first finished partition, so a run that fails
before any work is done leaves nothing behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tokmarg.errors import TokmargError
from tokmarg.records import PartitionMeta, PartitionResult, RecordError, conform, prediction_schema

RUN_FILE = "run.json"
LABELS_FILE = "labels.parquet"  # the true labels beside the predictions (written by the reduce)
LOCK_FILE = ".lock"
FORMAT = 1


class RunError(TokmargError, RuntimeError):
    """The run cannot start, resume or finish; one line."""


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_parquet(df: pd.DataFrame, path: Path, meta: dict | None = None) -> None:
    write_table(pa.Table.from_pandas(df, preserve_index=False), path, meta)


def write_table(table: pa.Table, path: Path, meta: dict | None = None) -> None:
    """Write an Arrow table as Parquet, atomically; ``meta`` goes into the schema metadata."""
    if meta is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"tokmarg": json.dumps(meta).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write(path, sink.getvalue().to_pybytes())


def parquet_meta(path: Path) -> dict:
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(b"tokmarg", b"{}"))


def plan(n_samples: int, size: int) -> list[tuple[int, int]]:
    """Partitions as (start, stop) sample ranges in file order."""
    if size < 1:
        raise RunError(f"--partition-size {size}: must be >= 1")
    return [(a, min(a + size, n_samples)) for a in range(0, n_samples, size)]


def _differences(stored: dict, now: dict) -> list[str]:
    out = []
    for key in sorted(set(stored) | set(now)):
        if stored.get(key) != now.get(key):
            out.append(f"{key} (run: {_short(stored.get(key))}, now: {_short(now.get(key))})")
    return out


def _short(v: object) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 60 else s[:57] + "..."


class RunDir:
    """One run directory; ``job`` is what the run computes (see :func:`tokmarg.runner.job_of`)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock: int | None = None

    def lock(self) -> None:
        """Hold ``RUN/.lock`` while this driver works on the run: a second driver is refused."""
        if self._lock is not None:
            return
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunError(
                f"{self.path}: another tokmarg driver is working on this run; wait for it or stop it"
            ) from None
        self._lock = fd

    def unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    @property
    def run_file(self) -> Path:
        return self.path / RUN_FILE

    def stored(self) -> dict | None:
        """``run.json`` of an existing run, or None for a new (absent or empty) directory."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise RunError(f"{p}: exists and is not a directory; choose another --out")
        if not self.run_file.is_file():
            # leftovers of a driver that died writing run.json do not make a directory foreign
            if p.is_dir() and any(not (c.name.endswith(".tmp") or c.name == LOCK_FILE) for c in p.iterdir()):
                raise RunError(f"{p}: exists, is not empty and holds no tokmarg run ({RUN_FILE}); choose another --out")
            return None
        try:
            data = json.loads(self.run_file.read_text(encoding="utf-8"))
            if data.get("format") != FORMAT or not isinstance(data.get("job"), dict):
                raise ValueError("unknown format")
        except (OSError, ValueError) as e:
            raise RunError(f"{self.run_file}: not a tokmarg run file ({e})") from None
        return data

    def check_same_job(self, stored: dict, job: dict) -> None:
        diffs = _differences(stored["job"], job)
        if diffs:
            raise RunError(
                f"{self.path}: holds a different run, so it cannot be resumed with these inputs: {'; '.join(diffs[:3])}"
            )

    def create(self, record: dict) -> None:
        """Write ``run.json`` (once: the first finished partition calls this)."""
        if not self.run_file.exists():
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock()
            atomic_write(self.run_file, (json.dumps(record, indent=2, default=str) + "\n").encode())

    def part_path(self, model: str, index: int) -> Path:
        return self.path / "partitions" / slug(model) / f"part-{index:05d}.parquet"

    def done(self, model: str, n_parts: int) -> set[int]:
        return {i for i in range(n_parts) if self.part_path(model, i).is_file()}

    def write_partition(self, result: PartitionResult, labels: Sequence[str]) -> bool:
        """Write one finished partition; False (and nothing written) if it is already there."""
        path = self.part_path(result.model, result.index)
        if path.exists():
            return False
        write_table(result.table(labels), path, result.meta.to_dict())
        return True

    def read_partitions(
        self, model: str, expected: Iterable[tuple[int, list[str]]], strategies: list[str], labels: Sequence[str]
    ) -> tuple[pa.Table, list[PartitionMeta]]:
        """All partitions of a model in order, each checked to hold exactly its samples x strategies."""
        tables, metas = [], []
        for index, ids in expected:
            path = self.part_path(model, index)
            if not path.is_file():
                raise RunError(f"{path}: missing; run `tokmarg eval --resume {self.path}` to compute it")
            try:
                t = conform(pq.read_table(path), labels)
            except (RecordError, OSError, pa.ArrowException) as e:
                raise RunError(f"{path}: {str(e).splitlines()[0]}; delete it and resume to recompute it") from None
            got = sorted(zip(t.column("strategy").to_pylist(), t.column("sample_id").to_pylist()))
            want = sorted((s, i) for s in strategies for i in ids)
            if got != want or set(t.column("model").to_pylist()) != {model}:
                raise RunError(
                    f"{path}: does not hold exactly the {len(want)} results of model {model!r}, partition {index} "
                    f"(it has {len(got)}); delete it and resume to recompute it"
                )
            tables.append(t)
            metas.append(PartitionMeta.from_dict(parquet_meta(path)))
        return pa.concat_tables(tables) if tables else prediction_schema(labels).empty_table(), metas

    def clean_temporaries(self) -> int:
        """Remove temporary files an interrupted writer left behind; returns how many."""
        n = 0
        if self.path.is_dir():
            for p in self.path.rglob(".*.tmp"):
                p.unlink(missing_ok=True)
                n += 1
        return n


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
