"""The run directory: what a run is, which partitions are done, atomic writes.

Layout (SPEC §6)::

    RUN/run.json                                  the job: inputs, settings and fingerprints
    RUN/partitions/<model>/part-00003.parquet     finished partitions of a model (3 and maybe others), atomically
    RUN/predictions/<model>.parquet               reduced, after the uncertainty step
    RUN/metrics.csv, RUN/tables/*.csv             metrics and cross-model tables
    RUN/manifest.json                             written last: the run is complete

A partition is done when a file holds it. The driver writes partitions that finished close
together as one file (:class:`PartitionWriter`), named by the first of them, its metadata listing
them all; files are written under a temporary name and renamed, so a file is never half there,
and a partition that was computed twice is written once. ``run.json`` appears with the first
finished partition, so a run that fails before any work is done leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tokmarg.errors import TokmargError
from tokmarg.records import PARQUET_OPTIONS, PartitionMeta, PartitionResult

RUN_FILE = "run.json"
LABELS_FILE = "labels.parquet"  # the true labels beside the predictions (written by the reduce)
LOCK_FILE = ".lock"
FORMAT = 1


class RunError(TokmargError, RuntimeError):
    """The run cannot start, resume or finish; one line."""


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def ids_sha256(ids: pa.Array | Sequence[str]) -> str:
    """The sha256 of sample ids, one per line in order: which rows a run (or a policy) holds."""
    values = ids.to_pylist() if isinstance(ids, pa.Array | pa.ChunkedArray) else list(ids)
    return hashlib.sha256("\n".join(values).encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one."""
    with atomic_file(path, "wb") as f:
        f.write(data)


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO]:
    """A file streamed in under a temporary name and renamed to ``path`` once written without
    error (``mode`` ``"w"``: UTF-8 text, ``"wb"``: bytes); on an error nothing is left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_parquet(df: pd.DataFrame, path: Path, meta: dict | None = None) -> None:
    write_table(pa.Table.from_pandas(df, preserve_index=False), path, meta)


def write_table(table: pa.Table, path: Path, meta: dict | None = None, **options: object) -> None:
    """Write an Arrow table as Parquet, atomically; ``meta`` goes into the schema metadata,
    ``options`` to ``pyarrow.parquet.write_table``."""
    if meta is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"tokmarg": json.dumps(meta).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **options)
    atomic_write(path, sink.getvalue().to_pybytes())


@contextlib.contextmanager
def parquet_writer(
    path: Path, schema: pa.Schema, meta: dict | None = None, **options: object
) -> Iterator[pq.ParquetWriter]:
    """A Parquet writer whose file appears at ``path`` only once it is closed without error
    (written under a temporary name, then renamed): tables are streamed in, never held whole."""
    if meta is not None:
        schema = schema.with_metadata({**(schema.metadata or {}), b"tokmarg": json.dumps(meta).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with pq.ParquetWriter(tmp, schema, **options) as w:
            yield w
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_partition_file(path: Path, metas: list[dict], table: pa.Table) -> None:
    """Partitions of one model as one file: a row group per strategy (a reader takes one
    strategy's rows without decoding the others'), the partitions' metas and the strategies'
    order in the metadata."""
    strategies = list(dict.fromkeys(table.column("strategy").to_pylist()))
    meta = {**(metas[0] if len(metas) == 1 else {"partitions": metas}), "strategies": strategies}
    col = table.column("strategy")
    with parquet_writer(path, table.schema, meta, **PARQUET_OPTIONS) as w:
        for s in strategies:
            w.write_table(table.filter(pc.equal(col, s)))


class PartitionFile:
    """A partition file: the indices of its partitions, and its rows a strategy at a time.

    The footer is read once, here; every :meth:`read` opens the file anew and closes it (a reader
    held open keeps the footer and its last row group's bytes: ~2 MB a file, 250 MB at 1M samples).
    The partitions' metas are the opener's to keep or drop (31,250 a model at 1M samples: ~40 MB)."""

    def __init__(self, path: Path, f: pq.ParquetFile, meta: dict, metas: Sequence[PartitionMeta]) -> None:
        """``meta``: the file's tokmarg metadata; ``metas``: the partitions it names."""
        self.path = path
        self.schema = f.schema_arrow.remove_metadata()
        self.names = set(self.schema.names)
        self.indices = tuple(m.index for m in metas)
        self.strategies: list[str] | None = meta.get("strategies")
        if self.strategies is not None and len(self.strategies) != f.num_row_groups:
            self.strategies = None  # not one row group per strategy: read whole and filter

    def read(self, columns: Sequence[str], strategy: str | None = None) -> pa.Table:
        """The ``columns`` (those the file has) of every row, or of ``strategy``'s rows."""
        present = [c for c in columns if c in self.names]
        if strategy is not None and self.strategies is not None and strategy not in self.strategies:
            return self.schema.empty_table().select(present)  # no rows of it here
        try:
            with pq.ParquetFile(self.path) as f:
                if strategy is None:
                    return f.read(columns=present)
                if self.strategies is not None:
                    return f.read_row_group(self.strategies.index(strategy), columns=present)
                t = f.read(columns=list(dict.fromkeys([*present, "strategy"])))
            return t.filter(pc.equal(t.column("strategy"), strategy)).select(present)
        except (OSError, ValueError, pa.ArrowException) as e:
            raise RunError(f"{self.path}: {str(e).splitlines()[0]}; delete it and resume to recompute it") from None


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
        self._done: dict[str, set[int]] = {}  # model -> partitions held by a file (once looked up)

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
        """The file a group of partitions starting at ``index`` is written to."""
        return self.path / "partitions" / slug(model) / f"part-{index:05d}.parquet"

    def partition_files(self, model: str) -> Iterator[Path]:
        yield from sorted((self.path / "partitions" / slug(model)).glob("part-*.parquet"))

    def done(self, model: str, n_parts: int) -> set[int]:
        """The partitions of ``model`` some file holds (read from the files' metadata)."""
        held: set[int] = set()
        for path in self.partition_files(model):
            held.update(m.index for m in self._metas(path, parquet_meta(path)))
        self._done[model] = held
        return {i for i in held if i < n_parts}

    def write_partitions(self, results: Sequence[PartitionResult], labels: Sequence[str]) -> int:
        """Write finished partitions of one model as one file, less those already written;
        returns how many it wrote."""
        if not results:
            return 0
        model = results[0].model
        done = self._done.get(model)
        if done is None:
            self.done(model, 1 << 62)
            done = self._done[model]
        fresh = sorted({r.index: r for r in results if r.index not in done}.values(), key=lambda r: r.index)
        if not fresh:
            return 0
        write_partition_file(
            self.part_path(model, fresh[0].index),
            [r.meta.to_dict() for r in fresh],
            pa.concat_tables([r.table(labels) for r in fresh]),
        )
        done.update(r.index for r in fresh)
        return len(fresh)

    @staticmethod
    def _metas(path: Path, meta: dict) -> list[PartitionMeta]:
        """The partitions a file holds, in row order (a file of one partition: its meta alone)."""
        try:
            return (
                [PartitionMeta.from_dict(m) for m in meta["partitions"]]
                if "partitions" in meta
                else [PartitionMeta.from_dict(meta)]
            )
        except (TypeError, KeyError) as e:
            raise RunError(
                f"{path}: its metadata names no partitions ({e}); delete it and resume to recompute it"
            ) from None

    def open_partition_file(self, path: Path) -> tuple[PartitionFile, list[PartitionMeta]]:
        """One partition file, opened (its footer read) once, and its partitions' metas; RunError
        if it cannot be."""
        try:
            with pq.ParquetFile(path) as f:
                meta = json.loads((f.schema_arrow.metadata or {}).get(b"tokmarg", b"{}"))
                metas = self._metas(path, meta)
                return PartitionFile(path, f, meta, metas), metas
        except (OSError, ValueError, pa.ArrowException) as e:
            raise RunError(f"{path}: {str(e).splitlines()[0]}; delete it and resume to recompute it") from None

    def read_partition_file(self, path: Path, columns: Sequence[str]) -> tuple[pa.Table, list[PartitionMeta]]:
        """The ``columns`` of one partition file and the partitions it holds."""
        f, metas = self.open_partition_file(path)
        return f.read(columns), metas

    def clean_temporaries(self) -> int:
        """Remove temporary files an interrupted writer left behind; returns how many."""
        n = 0
        if self.path.is_dir():
            for p in self.path.rglob(".*.tmp"):
                p.unlink(missing_ok=True)
                n += 1
        return n


FILE_SAMPLES_ENV = "TOKMARG_FILE_SAMPLES"  # samples per partition file (1: every partition as it finishes)


class PartitionWriter:
    """Buffers finished partitions and writes each model's as one file once they hold
    ``group_samples`` samples or the oldest waited ``max_wait`` seconds, and at :meth:`flush`: a
    million samples make a few hundred files, not one per partition. What a crash loses is the
    buffer, which a resume computes again."""

    GROUP_SAMPLES = 8192
    MAX_WAIT = 60.0  # seconds

    def __init__(
        self, rd: RunDir, labels: Sequence[str], group_samples: int | None = None, max_wait: float | None = None
    ) -> None:
        self.rd, self.labels = rd, list(labels)
        if group_samples is None:
            env = os.environ.get(FILE_SAMPLES_ENV, str(self.GROUP_SAMPLES))
            if not env.isdigit() or int(env) < 1:
                raise RunError(f"{FILE_SAMPLES_ENV}={env!r}: must be a whole number >= 1")
            group_samples = int(env)
        self.group_samples = group_samples
        self.max_wait = self.MAX_WAIT if max_wait is None else max_wait
        self._buf: dict[str, list[PartitionResult]] = {}
        self._since: dict[str, float] = {}
        self.written = 0

    def add(self, result: PartitionResult) -> None:
        buf = self._buf.setdefault(result.model, [])
        self._since.setdefault(result.model, time.monotonic())
        buf.append(result)
        if sum(len(r.sample_ids) for r in buf) >= self.group_samples or (
            time.monotonic() - self._since[result.model] >= self.max_wait
        ):
            self._write(result.model)

    def _write(self, model: str) -> None:
        self.written += self.rd.write_partitions(self._buf.pop(model, []), self.labels)
        self._since.pop(model, None)

    def flush(self) -> None:
        """Write everything buffered."""
        for model in list(self._buf):
            self._write(model)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
