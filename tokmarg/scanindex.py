"""A dataset file's scan kept beside the run, so that a resume does not parse the file again.

:func:`tokmarg.data.load_dataset` reads every row of a dataset file to validate it and keeps the
sample ids, their labels and where each sample is in the file (a million rows of JSONL: ~15 s).
The run directory keeps that scan as ``dataset_index.parquet``: typed columns (``id``, ``row``,
``offset``, one bool column per code) and, in the file's metadata, the key it was made under
(the file's SHA-256, format, column mapping, taxonomy, excluded codes, ``--skip-invalid``,
``--limit``, :data:`VERSION`) and what else the scan found (skipped rows, relabeled samples, one
sample per conversation shape). An index is used only under the very same key; anything else
(another file, other params, an unreadable index) and the file is scanned again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

INDEX_FILE = "dataset_index.parquet"
VERSION = 1  # bump when what a scan keeps, or how it reads a row, changes
_LABEL = "label:"


@dataclass(frozen=True, eq=False)
class ScanIndex:
    """What a dataset scan keeps, as arrays and JSON."""

    key: dict  # what the scan was made under (see the module docstring)
    ids: pa.Array  # (n,) string
    labels: np.ndarray  # (n, len(codes)) bool
    codes: tuple[str, ...]
    rows: np.ndarray  # (n,) int: each sample's 1-based line or row
    offsets: np.ndarray  # (n,) int: each sample's byte offset (JSONL; 0 otherwise)
    found: dict  # JSON: skipped (messages), n_relabeled, probes (one sample per conversation shape)


def table(index: ScanIndex) -> tuple[pa.Table, dict]:
    """``index`` as a table and the metadata to store with it (the run directory writes it:
    ``tokmarg.rundir.write_table``, atomically, the metadata under ``tokmarg``)."""
    columns = {"id": index.ids, "row": pa.array(index.rows), "offset": pa.array(index.offsets)}
    columns.update({f"{_LABEL}{c}": pa.array(index.labels[:, j]) for j, c in enumerate(index.codes)})
    return pa.table(columns), {"key": index.key, "codes": list(index.codes), "found": index.found}


def read(path: Path, key: dict) -> ScanIndex | None:
    """The index at ``path`` if it was made under ``key``; None if there is none, it was made
    under another key, or it cannot be read as one."""
    if not path.is_file():
        return None
    try:
        meta = json.loads((pq.read_schema(path).metadata or {}).get(b"tokmarg", b"{}"))
        if meta.get("key") != key:
            return None
        codes = tuple(meta["codes"])
        table = pq.read_table(path)
        n = table.num_rows
        labels = np.zeros((n, len(codes)), dtype=bool)
        for j, c in enumerate(codes):
            labels[:, j] = table.column(f"{_LABEL}{c}").to_numpy()
        ids = table.column("id").combine_chunks()
        if ids.type != pa.string() or ids.null_count or not n:
            return None
        rows, offsets = table.column("row").to_numpy(), table.column("offset").to_numpy()
        if rows.dtype.kind != "i" or offsets.dtype.kind != "i":
            return None
        return ScanIndex(key, ids, labels, codes, rows, offsets, dict(meta["found"]))
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
        return None
