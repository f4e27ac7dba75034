"""Loading labelled moderation datasets (JSONL, Parquet or CSV; SPEC section 5), streamed.

A file is read once, row by row (:mod:`tokmarg.sources`), to validate it: its SHA-256, its
sample ids, their labels and the first sample of each conversation shape are kept, not the
samples. :meth:`Dataset.read` parses a range of samples again when a partition needs them.

Three record shapes are accepted, detected per row:

* paper shape: ``{"unsafe_query": str, "llama_guard_3_categories": [codes]}`` (or
  ``llama_guard_2_categories``; the key must match the taxonomy) -> one user turn;
* general shape: ``{"id"?, "prompt": str, "response"?: str, "labels": [codes]}`` or
  ``{"id"?, "conversation": [{"role", "content"}, ...], "labels": [codes]}``;
  empty ``labels`` means safe;
* BeaverTails shape: ``{"prompt", "response", "category": {name: bool}, "is_safe": bool}``,
  mapped to the taxonomy by :data:`BEAVERTAILS_TO_LLAMA_GUARD`.

Every shape may carry an optional string ``"id"``; without one the id is the 1-based
line (JSONL) or row (Parquet, CSV) number. Blank lines are skipped but still counted, so line
numbers stay true. Keys not named above are ignored. ``labels`` may also be one string of
comma-separated codes, and a ``conversation`` a JSON string (as a CSV cell holds it). Params
``dataset:`` maps a file's own column names to these fields (:class:`~tokmarg.sources.ColumnMap`).

``limit`` keeps the first N valid samples and stops reading there: lines after the
N-th valid sample are neither validated nor counted as skipped.
"""

from __future__ import annotations

import functools
import json
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from tokmarg import scanindex
from tokmarg.errors import TokmargError
from tokmarg.sources import ColumnMap, Format, RowError, SourceError, check_file, file_sha256, format_of, rows
from tokmarg.taxonomy import Taxonomy

__all__ = [
    "BEAVERTAILS_TO_LLAMA_GUARD",
    "DataError",
    "Dataset",
    "Sample",
    "Turn",
    "load_dataset",
    "parse_line",
]

ROLES = ("user", "assistant")

#: The paper's published BeaverTails-to-Llama-Guard mapping: taxonomy name ->
#: {BeaverTails category: code}.
BEAVERTAILS_TO_LLAMA_GUARD: dict[str, dict[str, str]] = {
    "llama_guard_3": {
        "animal_abuse": "S1",
        "child_abuse": "S1",
        "controversial_topics,politics": "S13",
        "discrimination,stereotype,injustice": "S10",
        "drug_abuse,weapons,banned_substance": "S2",
        "financial_crime,property_crime,theft": "S2",
        "hate_speech,offensive_language": "S10",
        "misinformation_regarding_ethics,laws_and_safety": "S6",
        "non_violent_unethical_behavior": "S2",
        "privacy_violation": "S7",
        "self_harm": "S11",
        "sexually_explicit,adult_content": "S12",
        "terrorism,organized_crime": "S1",
        "violence,aiding_and_abetting,incitement": "S1",
    },
    "llama_guard_2": {
        "animal_abuse": "S1",
        "child_abuse": "S1",
        "controversial_topics,politics": "S9",
        "discrimination,stereotype,injustice": "S9",
        "drug_abuse,weapons,banned_substance": "S2",
        "financial_crime,property_crime,theft": "S2",
        "hate_speech,offensive_language": "S9",
        "misinformation_regarding_ethics,laws_and_safety": "S5",
        "non_violent_unethical_behavior": "S2",
        "privacy_violation": "S6",
        "self_harm": "S10",
        "sexually_explicit,adult_content": "S11",
        "terrorism,organized_crime": "S1",
        "violence,aiding_and_abetting,incitement": "S1",
    },
}

_PAPER_KEYS = {"llama_guard_3_categories": "llama_guard_3", "llama_guard_2_categories": "llama_guard_2"}
_SHAPES_HINT = (
    'expected one of: {"unsafe_query", "llama_guard_3_categories"|"llama_guard_2_categories"}; '
    '{"prompt", "response"?, "labels"}; {"conversation", "labels"}; '
    '{"prompt", "response", "category", "is_safe"}'
)


@dataclass(frozen=True)
class Turn:
    """One conversation turn; ``role`` is ``"user"`` or ``"assistant"``."""

    role: str
    content: str


@dataclass(frozen=True)
class Sample:
    """One labelled conversation.

    ``true_codes`` holds the taxonomy codes it is labelled with, deduplicated and in taxonomy
    order; ``()`` means safe.
    ``line`` is the 1-based line number in the source file.
    """

    id: str
    conversation: tuple[Turn, ...]
    true_codes: tuple[str, ...]
    line: int


@dataclass(frozen=True, eq=False)
class Dataset:
    """A validated dataset file: what the run keeps of it (ids, labels, hashes), not its samples;
    :meth:`read` parses a range of samples when they are needed."""

    path: str
    sha256: str
    ids: pa.Array  # (n,) string, in file order
    labels: np.ndarray  # (n, len(codes)) bool: each sample's true codes
    codes: tuple[str, ...]
    n_skipped: int
    skipped: tuple[str, ...]
    n_relabeled: int = 0  # samples that lost labels of codes the run excludes (`exclude_codes`)
    probes: tuple[Sample, ...] = ()  # the first sample of each conversation shape (sequence of roles)
    source: _Source | None = field(default=None, repr=False)
    key: dict | None = None  # what the scan was made under (tokmarg.scanindex); None: not from a file scan
    indexed: bool = False  # read from a kept scan (tokmarg.scanindex), not scanned again

    def __len__(self) -> int:
        return len(self.ids)

    @functools.cached_property
    def has_safe(self) -> bool:
        """Whether any sample is labelled safe (empty labels)."""
        return bool((~self.labels.any(axis=1)).any())

    def true_codes(self) -> list[tuple[str, ...]]:
        """Every sample's true codes (taxonomy order)."""
        return [tuple(self.codes[j] for j in np.flatnonzero(row)) for row in self.labels]

    def read(self, start: int = 0, stop: int | None = None) -> tuple[Sample, ...]:
        """Samples ``start:stop``, parsed from the file again."""
        stop = len(self) if stop is None else min(stop, len(self))
        if self.source is None or start >= stop:
            return ()
        return self.source.read(start, stop)

    @property
    def samples(self) -> tuple[Sample, ...]:
        """Every sample (parsed on each call: for small files, tests and tools)."""
        return self.read()

    def index(self) -> scanindex.ScanIndex:
        """The scan, to keep (:func:`tokmarg.scanindex.write`); only for a dataset read from a file."""
        if self.source is None or self.key is None:
            raise ValueError("only a dataset read from a file has a scan to keep")
        found = {
            "skipped": list(self.skipped),
            "n_relabeled": self.n_relabeled,
            "probes": [
                {
                    "id": p.id,
                    "line": p.line,
                    "true_codes": list(p.true_codes),
                    "turns": [[t.role, t.content] for t in p.conversation],
                }
                for p in self.probes
            ],
        }
        src = self.source
        return scanindex.ScanIndex(self.key, self.ids, self.labels, self.codes, src.rows_of, src.offsets, found)


class DataError(TokmargError, ValueError):
    """A dataset file or line is invalid.

    The message is one line: ``'<path>:<line>: <reason>'`` for a line, or
    ``'<path>: <reason>'`` for the file as a whole.
    """


# --------------------------------------------------------------------------- parsing


class _RecordError(ValueError):
    """An invalid record; the message is the reason (raised by :func:`parse_line`)."""


def _text(obj: dict, key: str, shape: str) -> str:
    """Return ``obj[key]`` as a non-empty string, or raise naming the field."""
    if key not in obj:
        raise _RecordError(f"missing field {key!r} ({shape} shape)")
    value = obj[key]
    if not isinstance(value, str):
        raise _RecordError(f"field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _RecordError(f"field {key!r} is empty text")
    return value


def _codes(obj: dict, key: str, taxonomy: Taxonomy) -> tuple[str, ...]:
    """Validate a list of codes (or a string of comma-separated codes) under ``key``; return them
    deduplicated in taxonomy order."""
    if key not in obj:
        raise _RecordError(f"missing field {key!r}")
    value = obj[key]
    if isinstance(value, str):
        value = [c.strip() for c in value.split(",") if c.strip()]
    if not isinstance(value, list):
        raise _RecordError(
            f"field {key!r} must be a list of codes or a comma-separated string, got {type(value).__name__}"
        )
    known = set(taxonomy.codes)
    for code in value:
        if not isinstance(code, str):
            raise _RecordError(f"field {key!r} must contain strings, got {type(code).__name__} {code!r}")
        if code not in known:
            raise _RecordError(
                f"unknown code {code!r} for taxonomy {taxonomy.name} (known: {', '.join(taxonomy.codes)})"
            )
    wanted = set(value)
    return tuple(c for c in taxonomy.codes if c in wanted)


def _conversation(value: object) -> tuple[Turn, ...]:
    """Validate a ``conversation`` list of ``{role, content}`` mappings (or its JSON text)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise _RecordError(
                f"field 'conversation' must be a list of turns or its JSON text; got text that is not JSON "
                f"({e.msg} at column {e.colno})"
            ) from None
    if not isinstance(value, list):
        raise _RecordError(f"field 'conversation' must be a list of turns, got {type(value).__name__}")
    if not value:
        raise _RecordError("field 'conversation' is empty")
    turns: list[Turn] = []
    for i, turn in enumerate(value):
        where = f"conversation[{i}]"
        if not isinstance(turn, dict):
            raise _RecordError(f"{where} must be an object with 'role' and 'content'")
        role = turn.get("role")
        if role not in ROLES:
            raise _RecordError(f"{where}.role must be 'user' or 'assistant', got {role!r}")
        content = turn.get("content")
        if not isinstance(content, str):
            raise _RecordError(f"{where}.content must be a string, got {type(content).__name__}")
        if not content.strip():
            raise _RecordError(f"{where}.content is empty text")
        turns.append(Turn(role, content))
    return tuple(turns)


def _beavertails(obj: dict, taxonomy: Taxonomy) -> tuple[tuple[Turn, ...], tuple[str, ...]]:
    """Parse a BeaverTails record into (conversation, labels)."""
    mapping = BEAVERTAILS_TO_LLAMA_GUARD.get(taxonomy.name)
    if mapping is None:
        raise _RecordError(f"no BeaverTails mapping for taxonomy {taxonomy.name}")
    conv = (
        Turn("user", _text(obj, "prompt", "BeaverTails")),
        Turn("assistant", _text(obj, "response", "BeaverTails")),
    )
    for key in ("category", "is_safe"):
        if key not in obj:
            raise _RecordError(f"missing field {key!r} (BeaverTails shape)")
    category, is_safe = obj["category"], obj["is_safe"]
    if not isinstance(is_safe, bool):
        raise _RecordError(f"field 'is_safe' must be true or false, got {type(is_safe).__name__}")
    if not isinstance(category, dict):
        raise _RecordError(f"field 'category' must be an object of name: bool, got {type(category).__name__}")
    hits: set[str] = set()
    for name, flag in category.items():
        if name not in mapping:
            raise _RecordError(f"unknown BeaverTails category {name!r}")
        if not isinstance(flag, bool):
            raise _RecordError(f"category {name!r} must be true or false, got {type(flag).__name__}")
        if flag:
            hits.add(mapping[name])
    if is_safe:
        return conv, ()
    if not hits:
        raise _RecordError("'is_safe' is false but no category is true")
    return conv, tuple(c for c in taxonomy.codes if c in hits)


def parse_line(obj: object, line: int, taxonomy: Taxonomy, labeled: bool = True) -> Sample:
    """Turn one decoded JSON value into a :class:`Sample`.

    ``line`` is the 1-based line number (the default id). With ``labeled=False`` a record may
    carry no labels (``{"prompt": ...}``, a paper-shape record without its categories): its
    codes are ``()``; labels it does carry are checked as ever. Raises ``ValueError`` whose
    message is the reason the record is invalid.
    """
    if not isinstance(obj, dict):
        raise _RecordError(f"expected a JSON object, got {type(obj).__name__}")

    sid = str(line)
    if "id" in obj:
        if not isinstance(obj["id"], str) or not obj["id"].strip():
            raise _RecordError(f"field 'id' must be a non-empty string, got {obj['id']!r}")
        sid = obj["id"]

    shape = _shape(obj, labeled)
    if shape == "paper":
        conv, labels = _paper(obj, taxonomy, labeled)
    elif shape == "BeaverTails":
        conv, labels = _beavertails(obj, taxonomy)
    else:
        conv, labels = _general(obj, taxonomy, labeled)
    return Sample(sid, conv, labels, line)


def _shape(obj: dict, labeled: bool = True) -> str:
    """Which of the three shapes the record has (exactly one)."""
    paper_keys = [k for k in _PAPER_KEYS if k in obj]
    shapes = [
        name
        for name, present in (
            ("paper", "unsafe_query" in obj or bool(paper_keys)),
            ("BeaverTails", "category" in obj or "is_safe" in obj),
            ("general", "labels" in obj or "conversation" in obj or (not labeled and "prompt" in obj)),
        )
        if present
    ]
    if len(shapes) > 1:
        raise _RecordError(f"ambiguous record: has keys of the {' and '.join(shapes)} shapes")
    if not shapes:
        keys = ", ".join(repr(k) for k in sorted(obj)) or "none"
        raise _RecordError(f"unrecognised record shape (keys: {keys}); {_SHAPES_HINT}")
    return shapes[0]


def _paper(obj: dict, taxonomy: Taxonomy, labeled: bool = True) -> tuple[tuple[Turn, ...], tuple[str, ...]]:
    paper_keys = [k for k in _PAPER_KEYS if k in obj]
    if not paper_keys and not labeled:
        return (Turn("user", _text(obj, "unsafe_query", "paper")),), ()
    if len(paper_keys) != 1:
        found = " and ".join(paper_keys) if paper_keys else "neither"
        raise _RecordError(
            f"paper shape needs exactly one of 'llama_guard_3_categories', 'llama_guard_2_categories' (found {found})"
        )
    key = paper_keys[0]
    if _PAPER_KEYS[key] != taxonomy.name:
        raise _RecordError(f"field {key!r} requires taxonomy {_PAPER_KEYS[key]}, but the taxonomy is {taxonomy.name}")
    return (Turn("user", _text(obj, "unsafe_query", "paper")),), _codes(obj, key, taxonomy)


def _general(obj: dict, taxonomy: Taxonomy, labeled: bool = True) -> tuple[tuple[Turn, ...], tuple[str, ...]]:
    if "conversation" in obj:
        for key in ("prompt", "response"):
            if key in obj:
                raise _RecordError(f"field {key!r} cannot be combined with 'conversation'")
        conv = _conversation(obj["conversation"])
    elif "prompt" in obj:
        conv = (Turn("user", _text(obj, "prompt", "general")),)
        if "response" in obj:
            conv += (Turn("assistant", _text(obj, "response", "general")),)
    else:
        raise _RecordError("missing field 'prompt' or 'conversation' (general shape)")
    return conv, _codes(obj, "labels", taxonomy) if labeled or "labels" in obj else ()


# --------------------------------------------------------------------------- loading


class _Source:
    """Where the valid samples are in the file: their rows (and, in JSONL, byte offsets). Reads
    a range of them again from a cursor that goes on from the last range read (partitions come in
    order), restarting (JSONL: at the row's offset) when asked for an earlier one; the last few
    ranges are kept parsed, for several models asking for the same partitions close together."""

    CACHE = 64

    def __init__(
        self, path: Path, fmt: Format, cmap: ColumnMap, taxonomy: Taxonomy, rows_of: np.ndarray, offsets: np.ndarray,
        kept: set[str], labeled: bool = True,
    ) -> None:  # fmt: skip
        self.path, self.fmt, self.cmap, self.taxonomy, self.kept = path, fmt, cmap, taxonomy, kept
        self.labeled = labeled
        self.rows_of, self.offsets = rows_of, offsets
        self._cache: OrderedDict[tuple[int, int], tuple[Sample, ...]] = OrderedDict()
        self._cursor: Iterator[tuple[int, object, int]] | None = None
        self._at = 0  # the row the cursor yielded last

    def read(self, start: int, stop: int) -> tuple[Sample, ...]:
        key = (start, stop)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        wanted = self.rows_of[start:stop].tolist()
        if self._cursor is None or wanted[0] <= self._at:
            offset = int(self.offsets[start]) if self.fmt is Format.JSONL else 0
            cols, lab = self.cmap.needed(), self.cmap.labels_column
            self._cursor = rows(self.path, self.fmt, cols, start=wanted[0], offset=offset, labels=lab)
        out: list[Sample] = []
        need = iter(wanted)
        nxt = next(need)
        for row, rec, _ in self._cursor:
            self._at = row
            if row == nxt:
                out.append(_sample(rec, row, self.fmt, self.cmap, self.taxonomy, self.kept, self.labeled)[0])
                nxt = next(need, None)
                if nxt is None:
                    break
        samples = tuple(out)
        self._cache[key] = samples
        if len(self._cache) > self.CACHE:
            self._cache.popitem(last=False)
        return samples


def _sample(
    rec: object, row: int, fmt: Format, cmap: ColumnMap, full: Taxonomy, kept: set[str], labeled: bool = True
) -> tuple[Sample, bool]:
    """One row as a sample (labels of excluded codes dropped) and whether any were dropped."""
    if isinstance(rec, RowError):
        raise rec
    if isinstance(rec, dict):
        rec = cmap.apply(rec)
        if fmt is not Format.JSONL and isinstance(rec.get("id"), int) and not isinstance(rec["id"], bool):
            rec["id"] = str(rec["id"])  # a numeric id column
    sample = parse_line(rec, row, full, labeled)
    if kept.issuperset(sample.true_codes):
        return sample, False
    return replace(sample, true_codes=tuple(c for c in sample.true_codes if c in kept)), True


def load_dataset(
    path: str | Path,
    taxonomy: Taxonomy,
    *,
    skip_invalid: bool = False,
    limit: int | None = None,
    fmt: str | None = None,
    columns: ColumnMap | None = None,
    index: Path | None = None,
    labeled: bool = True,
) -> Dataset:
    """Read and validate a dataset file against ``taxonomy``, streamed.

    With ``skip_invalid=False`` the first bad row raises :class:`DataError`
    (``'<path>:<line>: <reason>'``, ``'<path>: row <n>: <reason>'`` for Parquet and CSV); with
    ``skip_invalid=True`` bad rows are skipped and their messages recorded in ``Dataset.skipped``.
    A missing or unreadable file, or one with no valid sample, is always an error. ``limit`` keeps
    the first ``limit`` valid samples and validates no row after them (the whole file is still
    hashed). ``fmt``: jsonl, parquet or csv (default: from the extension); ``columns``: the params'
    column mapping. Labels of the taxonomy's excluded codes are valid and dropped (a sample left
    with none counts as safe); ``Dataset.n_relabeled`` counts such samples. ``index``: a kept scan
    (:mod:`tokmarg.scanindex`), used instead of reading the rows when it was made under the same
    key (this file's SHA-256 and these arguments). ``labeled=False``: rows may carry no labels
    (``tokmarg score``; see :func:`parse_line`).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    name, p = str(path), Path(path)
    cmap = columns or ColumnMap()
    try:
        check_file(p)
        form = format_of(p, fmt)
    except SourceError as e:
        raise DataError(str(e)) from None
    full, kept = taxonomy.complete(), set(taxonomy.codes)  # labels of excluded codes parse, then drop
    key = {
        "version": scanindex.VERSION,
        "sha256": file_sha256(p),
        "format": str(form),
        "columns": {
            "columns": dict(cmap.columns),
            "labels": cmap.labels if isinstance(cmap.labels, str | None) else dict(cmap.labels),
        },
        "taxonomy": [taxonomy.name, taxonomy.kin, list(taxonomy.codes), list(full.codes)],
        "skip_invalid": skip_invalid,
        "limit": limit,
        **({} if labeled else {"labeled": False}),
    }
    if index is not None and (kept_scan := scanindex.read(index, key)) is not None:
        try:
            src = _Source(p, form, cmap, full, kept_scan.rows, kept_scan.offsets, kept, labeled)
            return _from_index(kept_scan, name, src)
        except (KeyError, TypeError, ValueError):
            pass  # not what a scan writes: read the file
    col = {c: j for j, c in enumerate(taxonomy.codes)}
    ids: list[str] = []
    rows_of, offsets = array("q"), array("q")  # machine integers: a million rows are 16 MB, not 72
    hit_rows, hit_codes = array("q"), array("q")  # (sample, code column) of each true code
    skipped: list[str] = []
    seen: dict[str, int] = {}
    shapes: dict[tuple[str, ...], Sample] = {}
    relabeled = 0
    try:
        for row, rec, offset in rows(p, form, cmap.needed(), labels=cmap.labels_column):
            if limit is not None and len(ids) >= limit:
                break
            try:
                sample, dropped = _sample(rec, row, form, cmap, full, kept, labeled)
                if sample.id in seen:
                    raise _RecordError(f"duplicate sample id {sample.id!r} (first on {_at(form, seen[sample.id])})")
            except ValueError as exc:
                message = f"{name}{':' if form is Format.JSONL else ': row '}{row}: {cmap.where(str(exc))}"
                if not skip_invalid:
                    raise DataError(message) from None
                skipped.append(message)
                continue
            seen[sample.id] = row
            relabeled += dropped
            for c in sample.true_codes:
                hit_rows.append(len(ids))
                hit_codes.append(col[c])
            shapes.setdefault(tuple(t.role for t in sample.conversation), sample)
            ids.append(sample.id)
            rows_of.append(row)
            offsets.append(offset)
    except SourceError as e:
        raise DataError(str(e)) from None
    if not ids:
        detail = f" ({len(skipped)} invalid row(s) skipped)" if skipped else ""
        raise DataError(f"{name}: no valid samples{detail}")
    labels = np.zeros((len(ids), len(col)), dtype=bool)
    labels[np.frombuffer(hit_rows, np.int64), np.frombuffer(hit_codes, np.int64)] = True
    return Dataset(
        path=name,
        sha256=key["sha256"],
        ids=pa.array(ids, pa.string()),
        labels=labels,
        codes=tuple(taxonomy.codes),
        n_skipped=len(skipped),
        skipped=tuple(skipped),
        n_relabeled=relabeled,
        probes=tuple(shapes.values()),
        source=_Source(p, form, cmap, full, _compact(rows_of), _compact(offsets), kept, labeled),
        key=key,
    )


def _compact(values: array) -> np.ndarray:
    """Machine integers as int32 where they fit (rows; byte offsets in a file under 2 GiB), else int64."""
    a = np.frombuffer(values, dtype=np.int64)
    return a.astype(np.int32) if not a.size or a.max() < 2**31 else a.copy()


def _from_index(found: scanindex.ScanIndex, name: str, source: _Source) -> Dataset:
    """The dataset a kept scan describes."""
    extra = found.found
    probes = tuple(
        Sample(p["id"], tuple(Turn(r, c) for r, c in p["turns"]), tuple(p["true_codes"]), p["line"])
        for p in extra["probes"]
    )
    return Dataset(
        path=name,
        sha256=found.key["sha256"],
        ids=found.ids,
        labels=found.labels,
        codes=found.codes,
        n_skipped=len(extra["skipped"]),
        skipped=tuple(extra["skipped"]),
        n_relabeled=int(extra["n_relabeled"]),
        probes=probes,
        source=source,
        key=found.key,
        indexed=True,
    )


def _at(fmt: Format, row: int) -> str:
    return f"line {row}" if fmt is Format.JSONL else f"row {row}"
