"""A policy applied to raw scores: calibrated scores, per-code verdicts, the moderation records.

Pure functions of arrays, shared by ``calibrate`` (its held-out rows), ``score`` (every row, in
batches) and :class:`tokmarg.scorer.Scorer`, so the three give the same numbers for the same raw
scores. The output shape follows OpenAI's moderation result (``flagged``, ``categories``,
``category_scores``), keyed by the taxonomy's codes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from tokmarg.policy.file import Policy


@dataclass(frozen=True)
class Applied:
    """A policy's verdicts on ``n`` rows; columns are the policy's labels (``unsafe`` first)."""

    calibrated: np.ndarray  # (n, L) float64
    flags: np.ndarray  # (n, L) bool: calibrated >= the verdict's threshold
    flagged: np.ndarray  # (n,) bool: any flag (unsafe, or any code)


def apply_policy(policy: Policy, raw: np.ndarray) -> Applied:
    """Calibrate ``raw`` (n, L) with each verdict's map, flag at each verdict's threshold."""
    raw = np.asarray(raw, dtype=np.float64)
    if raw.ndim != 2 or raw.shape[1] != len(policy.verdicts):
        raise ValueError(f"raw scores of shape {raw.shape}, not (n, {len(policy.verdicts)}) for the policy's verdicts")
    cal = np.empty_like(raw)
    for j, v in enumerate(policy.verdicts):
        cal[:, j] = v.map.apply(raw[:, j])
    flags = cal >= np.array([v.threshold for v in policy.verdicts])[None, :]
    return Applied(cal, flags, flags.any(axis=1))


def raw_scores(scores: Sequence[dict[str, float] | None], labels: Sequence[str]) -> np.ndarray:
    """(n, len(labels)) float from per-sample score dicts (a label without a score, or no scores: 0)."""
    out = np.zeros((len(scores), len(labels)))
    for i, s in enumerate(scores):
        for j, lab in enumerate(labels):
            v = (s or {}).get(lab)
            if v is not None:
                out[i, j] = v
    return out


@dataclass(frozen=True)
class ScoreRecord:
    """One conversation's verdict under a policy (a row of ``scores.parquet``)."""

    id: str
    flagged: bool
    categories: dict[str, bool]  # code -> flagged
    category_scores: dict[str, float]  # code -> calibrated probability
    unsafe_score: float  # calibrated
    raw_scores: dict[str, float]  # label -> the strategy's raw score (unsafe and the codes)
    unexplored_mass: float | None  # the strategy's unexplored probability (its raw scores' upper bound gap)

    def moderation(self) -> dict:
        """The OpenAI-moderation-shaped object: ``id``, ``flagged``, ``categories``, ``category_scores``."""
        return {
            "id": self.id,
            "flagged": self.flagged,
            "categories": self.categories,
            "category_scores": self.category_scores,
        }


def _codes(policy: Policy) -> tuple[list[int], list[str]]:
    cols = [j for j, lab in enumerate(policy.labels) if lab != "unsafe"]
    return cols, [policy.labels[j] for j in cols]


def _unsafe_col(policy: Policy) -> int | None:
    return policy.labels.index("unsafe") if "unsafe" in policy.labels else None


def records(
    policy: Policy, ids: Sequence[str], raw: np.ndarray, unexplored: Sequence[float | None], applied: Applied
) -> list[ScoreRecord]:
    """One :class:`ScoreRecord` per row."""
    cols, codes = _codes(policy)
    u = _unsafe_col(policy)
    out = []
    for i, sid in enumerate(ids):
        out.append(
            ScoreRecord(
                id=str(sid),
                flagged=bool(applied.flagged[i]),
                categories={c: bool(applied.flags[i, j]) for c, j in zip(codes, cols)},
                category_scores={c: float(applied.calibrated[i, j]) for c, j in zip(codes, cols)},
                unsafe_score=float(applied.calibrated[i, u]) if u is not None else float("nan"),
                raw_scores={lab: float(raw[i, j]) for j, lab in enumerate(policy.labels)},
                unexplored_mass=None if unexplored[i] is None else float(unexplored[i]),
            )
        )
    return out


def score_schema(policy: Policy) -> pa.Schema:
    """``scores.parquet``: typed columns, a struct field per code (and per label for the raw scores)."""
    _, codes = _codes(policy)
    return pa.schema(
        [
            ("id", pa.string()),
            ("flagged", pa.bool_()),
            ("categories", pa.struct([(c, pa.bool_()) for c in codes])),
            ("category_scores", pa.struct([(c, pa.float64()) for c in codes])),
            ("unsafe_score", pa.float64()),
            ("raw_scores", pa.struct([(lab, pa.float64()) for lab in policy.labels])),
            ("unexplored_mass", pa.float64()),
        ]
    )


def score_table(
    policy: Policy, ids: pa.Array | Sequence[str], raw: np.ndarray, unexplored: np.ndarray, applied: Applied
) -> pa.Table:
    """Rows of ``scores.parquet`` (``unexplored``: (n,) float, NaN where the strategy has none)."""
    schema = score_schema(policy)
    cols, codes = _codes(policy)
    u = _unsafe_col(policy)

    def struct(values: np.ndarray, names: Sequence[str], kind: pa.DataType) -> pa.StructArray:
        return pa.StructArray.from_arrays([pa.array(values[:, j], kind) for j in range(len(names))], list(names))

    n = len(raw)
    unexplored = np.asarray(unexplored, dtype=np.float64)
    return pa.Table.from_arrays(
        [
            pa.array(ids, pa.string()),
            pa.array(applied.flagged, pa.bool_()),
            struct(applied.flags[:, cols], codes, pa.bool_()),
            struct(applied.calibrated[:, cols], codes, pa.float64()),
            pa.array(applied.calibrated[:, u] if u is not None else np.full(n, np.nan), pa.float64()),
            struct(np.asarray(raw, dtype=np.float64), policy.labels, pa.float64()),
            pa.array(unexplored, pa.float64(), mask=np.isnan(unexplored)),
        ],
        schema=schema,
    )


def moderation_lines(table: pa.Table) -> Iterator[str]:
    """One JSON line per row of a :func:`score_table`: the OpenAI moderation shape with the row's id."""
    ids = table.column("id").to_pylist()
    flagged = table.column("flagged").to_pylist()
    cats = table.column("categories").to_pylist()
    scores = table.column("category_scores").to_pylist()
    for i in range(table.num_rows):
        row = {"id": ids[i], "flagged": flagged[i], "categories": cats[i], "category_scores": scores[i]}
        yield json.dumps(row, allow_nan=False) + "\n"
