"""The policy file: what ``tokmarg calibrate`` fitted, as YAML a person can read and diff.

One file per model x strategy, no pickle: plain mappings, lists and numbers (floats written as
Python's shortest repr, so they read back to the same bits). Layout::

    format: tokmarg-policy/1
    tokmarg_version, created, run
    model:       id, sha256 (of its config, weight and tokenizer files), files, dtype
    prompt:      format, sha256 (of the rendered template), answer_prefix
    taxonomy:    name, codes, excluded
    strategy:    name, semantics, params
    calibration: method, objective, folds, seed, min_positives
    dataset:     sha256, rows, fit_rows, held_out_rows
    verdicts:    unsafe and each code: fitted, note, map, threshold, objective_met, fit, held_out
    flagged:     rule, held_out
    summary:     held-out rates of the codes together
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from tokmarg.errors import TokmargError
from tokmarg.policy.maps import CalibrationMap

FORMAT = "tokmarg-policy/1"
SECTIONS = ("model", "prompt", "taxonomy", "strategy", "calibration", "dataset", "verdicts")
FLAGGED_RULE = "unsafe at its threshold, or any code at its own"
STRINGS = (  # (section, key) read as text where the policy is used
    ("model", "id"), ("model", "sha256"), ("prompt", "sha256"), ("prompt", "format"), ("taxonomy", "name"),
    ("strategy", "name"), ("strategy", "semantics"), ("dataset", "sha256"),
)  # fmt: skip
INTEGERS = (("calibration", "seed", 0), ("calibration", "folds", 2), ("dataset", "partition_size", 1))


class PolicyError(TokmargError, ValueError):
    """A policy file that cannot be read or used; one line naming the file and key."""


@dataclass(frozen=True)
class Verdict:
    """One verdict's (``unsafe`` or a code's) map and threshold, and what they measured."""

    label: str
    map: CalibrationMap
    threshold: float
    fitted: bool
    note: str
    objective_met: bool | None
    fit: dict
    held_out: dict

    def to_dict(self) -> dict:
        return {
            "fitted": self.fitted,
            "note": self.note,
            "map": self.map.to_dict(),
            "threshold": float(self.threshold),
            "objective_met": self.objective_met,
            "fit": self.fit,
            "held_out": self.held_out,
        }


@dataclass(frozen=True)
class Policy:
    """A policy file's content; ``verdicts`` in the order of the scores: ``unsafe``, then the codes."""

    header: dict  # tokmarg_version, created, run
    model: dict
    prompt: dict
    taxonomy: dict
    strategy: dict
    calibration: dict
    dataset: dict
    verdicts: tuple[Verdict, ...]
    flagged: dict
    summary: dict

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(self.taxonomy["codes"])

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(v.label for v in self.verdicts)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            **self.header,
            "model": self.model,
            "prompt": self.prompt,
            "taxonomy": self.taxonomy,
            "strategy": self.strategy,
            "calibration": self.calibration,
            "dataset": self.dataset,
            "verdicts": {v.label: v.to_dict() for v in self.verdicts},
            "flagged": self.flagged,
            "summary": self.summary,
        }

    def to_yaml(self) -> str:
        head = (
            f"# tokmarg policy: {self.model['id']} / {self.strategy['name']}, fitted by `tokmarg calibrate`.\n"
            "# Apply it with `tokmarg score --policy THIS_FILE --dataset FILE`. Metrics under `held_out`\n"
            "# are measured on rows that fitted neither the map nor the threshold.\n"
        )
        return head + yaml.dump(_plain(self.to_dict()), Dumper=_Dumper, sort_keys=False, width=100)


class _Dumper(yaml.SafeDumper):
    """Mappings one key a line (a change shows as its own line in a diff), lists of numbers on one."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def _plain(v: object) -> object:
    """Mappings, lists, str, bool, int and float only (numpy scalars made Python ones)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, bool | np.bool_):
        return bool(v)
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, int | np.integer):
        return int(v)
    return float(v)  # type: ignore[arg-type]


def _section(doc: dict, key: str, path: Path) -> dict:
    v = doc.get(key)
    if not isinstance(v, dict):
        raise PolicyError(f"{path}: {key}: missing or not a mapping")
    return v


def _verdict(label: str, d: object, path: Path) -> Verdict:
    where = f"verdicts.{label}"
    if not isinstance(d, dict):
        raise PolicyError(f"{path}: {where}: not a mapping")
    t = d.get("threshold")
    if not isinstance(t, int | float) or isinstance(t, bool) or math.isnan(t):
        raise PolicyError(f"{path}: {where}.threshold: expected a number, got {t!r}")
    try:
        m = CalibrationMap.from_dict(d.get("map"), f"{where}.map")
    except ValueError as e:
        raise PolicyError(f"{path}: {e}") from None
    fit, held = d.get("fit") or {}, d.get("held_out") or {}
    return Verdict(label, m, float(t), bool(d.get("fitted")), str(d.get("note", "")), d.get("objective_met"), fit, held)


def read_policy(path: Path) -> Policy:
    """Read and check a policy file; :class:`PolicyError` in one line naming the file and key."""
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise PolicyError(f"{path}: cannot read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise PolicyError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise PolicyError(f"{path}: format: expected {FORMAT!r}, got {got!r} (not a tokmarg policy file?)")
    sec = {k: _section(doc, k, path) for k in SECTIONS}
    for key, field in STRINGS:
        if not isinstance(sec[key].get(field), str):
            raise PolicyError(f"{path}: {key}.{field}: missing or not a string")
    for key, field, low in INTEGERS:
        v = sec[key].get(field)
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise PolicyError(f"{path}: {key}.{field}: expected a whole number >= {low}, got {v!r}")
    files = sec["model"].get("files", {})
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise PolicyError(f"{path}: model.files: expected a mapping of file name to sha256")
    if not isinstance(sec["strategy"].get("params", {}), dict):
        raise PolicyError(f"{path}: strategy.params: expected a mapping")
    codes = sec["taxonomy"].get("codes")
    if not isinstance(codes, list) or not codes or not all(isinstance(c, str) for c in codes):
        raise PolicyError(f"{path}: taxonomy.codes: expected a list of codes")
    given = {str(lab): _verdict(str(lab), d, path) for lab, d in sec["verdicts"].items()}
    for label in ("unsafe", *codes):
        if label not in given:
            raise PolicyError(f"{path}: verdicts: no verdict for {label!r} (unsafe and every code of taxonomy.codes)")
    extra = [lab for lab in given if lab not in codes and lab != "unsafe"]
    if extra:
        raise PolicyError(f"{path}: verdicts.{extra[0]}: not a code of taxonomy.codes")
    verdicts = tuple(given[lab] for lab in ("unsafe", *codes))  # in the order scores are laid out
    header = {k: doc[k] for k in ("tokmarg_version", "created", "run") if k in doc}
    return Policy(
        header,
        sec["model"],
        sec["prompt"],
        sec["taxonomy"],
        sec["strategy"],
        sec["calibration"],
        sec["dataset"],
        verdicts,
        doc.get("flagged") or {},
        doc.get("summary") or {},
    )
