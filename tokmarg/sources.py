"""Dataset files read as streams of rows: JSONL, Parquet or CSV (pyarrow), never held whole.

:func:`rows` yields ``(row, record)`` pairs, ``row`` the 1-based line (JSONL) or data row
(Parquet, CSV) and ``record`` a dict (or, for a JSONL line that is not valid JSON, the
:class:`RowError` saying so). A :class:`ColumnMap` (params ``dataset:``) renames a file's
columns to the record fields tokmarg reads (``id``, ``prompt``, ``response``, ``conversation``,
``labels``), and turns labels given as a comma-separated string or as one 0/1 column per code into
a list. :func:`file_sha256` hashes a file in chunks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from tokmarg.choices import Format, allowed, choose
from tokmarg.errors import TokmargError

BATCH_ROWS = 4096  # rows of a Parquet or CSV file decoded at once
FIELDS = ("id", "prompt", "response", "conversation", "labels")


EXTENSIONS = {".jsonl": Format.JSONL, ".json": Format.JSONL, ".parquet": Format.PARQUET, ".csv": Format.CSV}


class SourceError(TokmargError, ValueError):
    """A dataset file cannot be read at all; one line naming it."""


class RowError(ValueError):
    """One row cannot be read as a record; the message is the reason."""


@dataclass(frozen=True)
class ColumnMap:
    """Params ``dataset:``: which column holds each record field.

    ``labels`` is one column (a list of codes, or a comma-separated string of them) or a mapping
    code -> column of 0/1 (or true/false) values.
    """

    columns: Mapping[str, str] = field(default_factory=dict)  # field -> column, for id/prompt/response/conversation
    labels: str | Mapping[str, str] | None = None

    @property
    def labels_column(self) -> str:
        return self.labels if isinstance(self.labels, str) else "labels"

    @property
    def empty(self) -> bool:
        return not self.columns and self.labels is None

    def needed(self) -> list[str] | None:
        """The columns to read (None: all of them)."""
        if self.empty:
            return None
        cols = list(self.columns.values())
        if isinstance(self.labels, str):
            cols.append(self.labels)
        elif self.labels:
            cols.extend(self.labels.values())
        return list(dict.fromkeys(cols))

    def apply(self, rec: dict) -> dict:
        """A row of the file as a record of the fields tokmarg reads."""
        if self.empty:
            return rec
        out = {f: rec[c] for f, c in self.columns.items() if rec.get(c) is not None}
        if isinstance(self.labels, str):
            if self.labels not in rec:
                raise RowError(f"missing column {self.labels!r} (labels)")
            out["labels"] = rec[self.labels]
        elif self.labels:
            out["labels"] = [code for code, col in self.labels.items() if _flag(rec.get(col), col)]
        return out

    def where(self, message: str) -> str:
        """``message`` with each mapped field named by its column too."""
        for f, c in {**self.columns, **({"labels": self.labels} if isinstance(self.labels, str) else {})}.items():
            message = message.replace(f"field {f!r}", f"field {f!r} (column {c!r})", 1)
        return message


FLAGS = {"0": False, "1": True, "false": False, "true": True}


def _flag(value: object, col: str) -> bool:
    """A one-hot label cell: 0/1, true/false (as numbers, booleans or text)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in FLAGS:
        return FLAGS[value.strip().lower()]
    raise RowError(f"column {col!r}: {value!r} is not 0 or 1")


def format_of(path: Path, given: str | None) -> Format:
    """The format ``--format`` names, else the one of the file's extension."""
    if given is not None:
        return choose(Format, given, "--format", SourceError)
    fmt = EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise SourceError(
            f"{path}: cannot tell the format from the extension {path.suffix!r} "
            f"(.jsonl, .parquet, .csv); give --format {allowed(Format, '|')}"
        )
    return fmt


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_file(path: Path) -> None:
    if not path.exists():
        raise SourceError(f"{path}: no such file")
    if path.is_dir():
        raise SourceError(f"{path}: is a directory, not a dataset file")


def rows(
    path: Path,
    fmt: Format,
    columns: list[str] | None = None,
    start: int = 1,
    offset: int = 0,
    labels: str = "labels",
) -> Iterator[tuple[int, object, int]]:
    """The file's rows from row ``start`` on: ``(row, dict, offset)``, or ``(row, RowError, offset)``
    for a JSONL line that is not valid JSON; blank JSONL lines are skipped (their numbers still
    count). ``offset``: a JSONL line's byte offset (where reading starts when given: the offset of
    line ``start``); 0 for Parquet and CSV. An empty or null cell is an absent field, except in the
    ``labels`` column, where empty text means no codes."""
    if fmt is Format.JSONL:
        yield from _jsonl(path, start, offset)
    else:
        yield from ((row, rec, 0) for row, rec in _table(path, fmt, columns, start, labels))


def _jsonl(path: Path, start: int, offset: int) -> Iterator[tuple[int, object, int]]:
    with open(path, "rb") as f:
        f.seek(offset)
        first = 1 if offset == 0 else start
        for lineno, raw in enumerate(f, start=first):  # split on "\n" only: JSON strings may hold U+2028
            where = offset
            offset += len(raw)
            if lineno < start:
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SourceError(f"{path}: not valid UTF-8 (line {lineno}, byte {where + e.start})") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                continue
            try:
                rec: object = json.loads(line)
            except json.JSONDecodeError as e:
                rec = RowError(f"not valid JSON ({e.msg} at column {e.colno})")
            yield lineno, rec, where


def _batches(path: Path, fmt: Format, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
    try:
        if fmt is Format.PARQUET:
            f = pq.ParquetFile(path)
            missing = [c for c in columns or [] if c not in f.schema_arrow.names]
            if missing:
                raise SourceError(f"{path}: no column {missing[0]!r} (columns: {', '.join(f.schema_arrow.names)})")
            yield from f.iter_batches(batch_size=BATCH_ROWS, columns=columns)
        else:
            opts = pacsv.ConvertOptions(include_columns=columns)
            reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=1 << 22), convert_options=opts)
            yield from reader
    except (OSError, pa.ArrowException) as e:
        msg = str(e).splitlines()[0]
        if "No such column" in msg or "include_columns" in msg:
            raise SourceError(f"{path}: {msg}") from None
        raise SourceError(f"{path}: not a readable {fmt.value.upper()} file ({msg})") from None


def _table(path: Path, fmt: Format, columns: list[str] | None, start: int, labels: str) -> Iterator[tuple[int, object]]:
    row = 0
    for batch in _batches(path, fmt, columns):
        if row + batch.num_rows < start:
            row += batch.num_rows
            continue
        for rec in batch.to_pylist():
            row += 1
            if row >= start:
                yield row, {k: v for k, v in rec.items() if v is not None and (v != "" or k == labels)}
