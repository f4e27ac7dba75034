"""Loading labelled moderation datasets (JSONL, one sample per line; SPEC section 5).

Three record shapes are accepted, detected per line:

* paper shape: ``{"unsafe_query": str, "llama_guard_3_categories": [codes]}`` (or
  ``llama_guard_2_categories``; the key must match the taxonomy) -> one user turn;
* general shape: ``{"id"?, "prompt": str, "response"?: str, "labels": [codes]}`` or
  ``{"id"?, "conversation": [{"role", "content"}, ...], "labels": [codes]}``;
  empty ``labels`` means safe;
* BeaverTails shape: ``{"prompt", "response", "category": {name: bool}, "is_safe": bool}``,
  mapped to the taxonomy by :data:`BEAVERTAILS_TO_LLAMA_GUARD`.

Every shape may carry an optional string ``"id"``; without one the id is the 1-based
line number. Blank lines are skipped but still counted, so line numbers stay true.
Keys not named above are ignored.

``limit`` keeps the first N valid samples and stops reading there: lines after the
N-th valid sample are neither validated nor counted as skipped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

from tokmarg.errors import TokmargError
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


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset: its samples, the file's SHA-256 and the lines skipped as invalid."""

    path: str
    sha256: str
    samples: tuple[Sample, ...]
    n_skipped: int
    skipped: tuple[str, ...]
    n_relabeled: int = 0  # samples that lost labels of codes the run excludes (`exclude_codes`)

    @property
    def has_safe(self) -> bool:
        """Whether any sample is labelled safe (empty labels)."""
        return any(not s.true_codes for s in self.samples)


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
    """Validate a list of codes under ``key``; return them deduplicated in taxonomy order."""
    if key not in obj:
        raise _RecordError(f"missing field {key!r}")
    value = obj[key]
    if not isinstance(value, list):
        raise _RecordError(f"field {key!r} must be a list of codes, got {type(value).__name__}")
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
    """Validate a ``conversation`` list of ``{role, content}`` mappings."""
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


def parse_line(obj: object, line: int, taxonomy: Taxonomy) -> Sample:
    """Turn one decoded JSON value into a :class:`Sample`.

    ``line`` is the 1-based line number (the default id). Raises ``ValueError`` whose
    message is the reason the record is invalid.
    """
    if not isinstance(obj, dict):
        raise _RecordError(f"expected a JSON object, got {type(obj).__name__}")

    sid = str(line)
    if "id" in obj:
        if not isinstance(obj["id"], str) or not obj["id"].strip():
            raise _RecordError(f"field 'id' must be a non-empty string, got {obj['id']!r}")
        sid = obj["id"]

    shape = _shape(obj)
    if shape == "paper":
        conv, labels = _paper(obj, taxonomy)
    elif shape == "BeaverTails":
        conv, labels = _beavertails(obj, taxonomy)
    else:
        conv, labels = _general(obj, taxonomy)
    return Sample(sid, conv, labels, line)


def _shape(obj: dict) -> str:
    """Which of the three shapes the record has (exactly one)."""
    paper_keys = [k for k in _PAPER_KEYS if k in obj]
    shapes = [
        name
        for name, present in (
            ("paper", "unsafe_query" in obj or bool(paper_keys)),
            ("BeaverTails", "category" in obj or "is_safe" in obj),
            ("general", "labels" in obj or "conversation" in obj),
        )
        if present
    ]
    if len(shapes) > 1:
        raise _RecordError(f"ambiguous record: has keys of the {' and '.join(shapes)} shapes")
    if not shapes:
        keys = ", ".join(repr(k) for k in sorted(obj)) or "none"
        raise _RecordError(f"unrecognised record shape (keys: {keys}); {_SHAPES_HINT}")
    return shapes[0]


def _paper(obj: dict, taxonomy: Taxonomy) -> tuple[tuple[Turn, ...], tuple[str, ...]]:
    paper_keys = [k for k in _PAPER_KEYS if k in obj]
    if len(paper_keys) != 1:
        found = " and ".join(paper_keys) if paper_keys else "neither"
        raise _RecordError(
            f"paper shape needs exactly one of 'llama_guard_3_categories', 'llama_guard_2_categories' (found {found})"
        )
    key = paper_keys[0]
    if _PAPER_KEYS[key] != taxonomy.name:
        raise _RecordError(f"field {key!r} requires taxonomy {_PAPER_KEYS[key]}, but the taxonomy is {taxonomy.name}")
    return (Turn("user", _text(obj, "unsafe_query", "paper")),), _codes(obj, key, taxonomy)


def _general(obj: dict, taxonomy: Taxonomy) -> tuple[tuple[Turn, ...], tuple[str, ...]]:
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
    return conv, _codes(obj, "labels", taxonomy)


# --------------------------------------------------------------------------- loading


def _read(name: str) -> tuple[bytes, str]:
    """The file's bytes and its text (UTF-8, without a byte-order mark)."""
    p = Path(name)
    if not p.exists():
        raise DataError(f"{name}: no such file")
    if p.is_dir():
        raise DataError(f"{name}: is a directory, not a JSONL file")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise DataError(f"{name}: cannot read ({exc.strerror or exc})") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{name}: not valid UTF-8 (line {bad_line}, byte {exc.start})") from exc
    return raw, text.removeprefix("\ufeff")


def load_dataset(
    path: str | Path, taxonomy: Taxonomy, *, skip_invalid: bool = False, limit: int | None = None
) -> Dataset:
    """Load and validate a JSONL dataset against ``taxonomy``.

    With ``skip_invalid=False`` the first bad line raises :class:`DataError`
    (``'<path>:<line>: <reason>'``); with ``skip_invalid=True`` bad lines are skipped and
    their messages recorded in ``Dataset.skipped``. A missing or non-UTF-8 file, or one
    with no valid sample, is always an error. ``limit`` keeps the first ``limit`` valid
    samples and stops reading after them. Labels of the taxonomy's excluded codes are valid and
    dropped (a sample left with none counts as safe); ``Dataset.n_relabeled`` counts such samples.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    name = str(path)
    raw, text = _read(name)
    samples: list[Sample] = []
    skipped: list[str] = []
    seen: dict[str, int] = {}
    full, kept = taxonomy.complete(), set(taxonomy.codes)  # labels of excluded codes parse, then drop
    relabeled = 0
    # split on "\n" only: JSON strings may legally hold other line separators (U+2028, ...)
    for lineno, raw_line in enumerate(text.split("\n"), start=1):
        if limit is not None and len(samples) >= limit:
            break
        line = raw_line.rstrip("\r")
        if not line.strip():
            continue
        try:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _RecordError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
            sample = parse_line(obj, lineno, full)
            if sample.id in seen:
                raise _RecordError(f"duplicate sample id {sample.id!r} (first on line {seen[sample.id]})")
        except ValueError as exc:
            message = f"{name}:{lineno}: {exc}"
            if not skip_invalid:
                raise DataError(message) from None
            skipped.append(message)
            continue
        seen[sample.id] = lineno
        if taxonomy.excluded and not kept.issuperset(sample.true_codes):
            sample = replace(sample, true_codes=tuple(c for c in sample.true_codes if c in kept))
            relabeled += 1
        samples.append(sample)

    if not samples:
        detail = f" ({len(skipped)} invalid line(s) skipped)" if skipped else ""
        raise DataError(f"{name}: no valid samples{detail}")
    return Dataset(
        path=name,
        sha256=hashlib.sha256(raw).hexdigest(),
        samples=tuple(samples),
        n_skipped=len(skipped),
        skipped=tuple(skipped),
        n_relabeled=relabeled,
    )
