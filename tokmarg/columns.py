"""Prediction tables as arrays: read column-wise into :class:`StrategyResults`, written back.

The reduce and the report read partition and prediction files (:func:`tokmarg.records.prediction_schema`)
as Arrow columns turned into numpy arrays, a model at a time and only the columns a step needs:
no Python object per cell. Rows may come in any order; :meth:`ModelArrays.add` places them by
sample position and :meth:`ModelArrays.results` checks that every strategy has exactly one row per
sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tokmarg.records import RecordError

# what the reduce reads of a partition (the rest is copied into the predictions as it is)
REDUCE_COLUMNS = (
    "model",
    "strategy",
    "sample_id",
    "scores",
    "pred_labels",
    "uncertainty",
    "ranked",
    "gate_unsafe",
    "tokens_forwarded",
    "extra",
)
SCORE_COLUMNS = ("model", "strategy", "sample_id", "scores")  # what the report reads of older runs


@dataclass
class StrategyResults:
    """One model x strategy over every sample, in the run's sample order."""

    model: str
    strategy: str
    code_scores: np.ndarray | None  # (n, len(codes)) float, C-contiguous, no score = 0; None: no scores at all
    named: np.ndarray  # (n, len(codes)) bool: the codes each sample names (the fit sets the fitted kinds')
    uncertainty: np.ndarray  # (n,) float, NaN where the strategy has none
    top: np.ndarray  # (n, 2) int: best and second-best code by evidence as a code column, -1 none
    gate_unsafe: np.ndarray  # (n,) float: 1 unsafe, 0 safe, NaN no gate
    unsafe_in_output: np.ndarray  # (n,) bool: the greedy output says unsafe
    tokens_forwarded: np.ndarray  # (n,) int
    keep: np.ndarray | None = None  # (n,) int: top codes predicted (0, 1, 2), set by the uncertainty fit
    unsafe_score: np.ndarray | None = None  # (n,) float, no score = 0; None with ``code_scores``

    def slim(self) -> StrategyResults:
        """These results with only what writing fitted ``pred_labels`` needs (top codes, how many)."""
        empty = np.zeros(0)
        return StrategyResults(
            self.model, self.strategy, None, np.zeros((0, 0), bool), empty, self.top.astype(np.int16), empty,
            np.zeros(0, bool), np.zeros(0, np.int64), None if self.keep is None else self.keep.astype(np.int8),
        )  # fmt: skip

    def drop_unused(self, thresholded: bool) -> None:
        """Free what the metrics do not read, once the uncertainty fit has run: the uncertainty,
        the gate, the top codes unless fitted (writing the fitted codes needs them) and, where the
        codes come from thresholded scores, the named codes (34 MB at 1M samples x 14 codes)."""
        self.uncertainty = self.gate_unsafe = np.zeros(0)
        if self.keep is None:
            self.top = np.zeros((0, 2), dtype=np.int16)
        if thresholded and self.code_scores is not None:
            self.named = np.zeros((0, self.named.shape[1]), dtype=bool)

    def set_top_k(self, keep: np.ndarray) -> None:
        """Predict each sample's ``keep[i]`` best codes (the uncertainty strategies' fit)."""
        self.keep = np.asarray(keep, dtype=np.int64)
        self.named = np.zeros_like(self.named)
        rows = np.arange(len(self.keep))
        for j in (0, 1):
            hit = (self.keep > j) & (self.top[:, j] >= 0)
            self.named[rows[hit], self.top[hit, j]] = True

    def pred_labels(self, positions: np.ndarray, codes: Sequence[str]) -> pa.ListArray:
        """The fitted ``pred_labels`` cells of the samples at ``positions``: each one's best codes,
        best first."""
        if self.keep is None:
            raise ValueError(f"{self.model} / {self.strategy}: not fitted")
        keep, top = self.keep[positions], self.top[positions]
        mask = np.arange(2)[None, :] < keep[:, None]
        offsets = np.r_[0, np.cumsum(keep)].astype(np.int32)
        values = pa.array(list(codes), pa.string()).take(pa.array(top[mask], pa.int64()))
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)


def _floats(col: pa.Array | pa.ChunkedArray, fill: float) -> np.ndarray:
    return pc.fill_null(pc.cast(col, pa.float64()), fill).to_numpy(zero_copy_only=False)


def _struct_field(col: pa.Array, name: str) -> pa.Array | None:
    return pc.struct_field(col, [name]) if name in {f.name for f in col.type} else None


def _code_matrix(col: pa.Array, codes: Sequence[str]) -> np.ndarray:
    """(rows, len(codes)) bool from a list<string> column: which codes each cell holds (others ignored)."""
    out = np.zeros((len(col), len(codes)), dtype=bool)
    flat = pc.list_flatten(col)
    if len(flat):
        parent = pc.list_parent_indices(col).to_numpy(zero_copy_only=False)
        j = pc.index_in(flat, value_set=pa.array(list(codes), pa.string()))
        known = pc.is_valid(j).to_numpy(zero_copy_only=False)
        out[parent[known], j.to_numpy(zero_copy_only=False)[known].astype(np.int64)] = True
    return out


def _top2(col: pa.Array, codes: Sequence[str]) -> np.ndarray:
    """(rows, 2) int: the first two entries of each list<string> cell as code columns (-1 none)."""
    out = np.full((len(col), 2), -1, dtype=np.int64)
    if col.null_count == len(col):
        return out
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.r_[0, np.cumsum(lengths)]  # into the flattened values (null cells hold none)
    j = pc.index_in(pc.list_flatten(col), value_set=pa.array(list(codes), pa.string()))
    flat = pc.fill_null(j, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    for k in (0, 1):
        has = lengths > k
        out[has, k] = flat[offsets[:-1][has] + k]
    return out


class ModelArrays:
    """Collects one model's rows, from files read one by one, into per-strategy arrays."""

    def __init__(self, model: str, strategies: Sequence[str], n: int, labels: Sequence[str]) -> None:
        self.model, self.strategies, self.n, self.labels = model, list(strategies), n, list(labels)
        self.codes = self.labels[1:]
        k = len(self.codes)
        # rows per sample as a byte (wraps at 256) and rows in all: one each exactly when every byte
        # is 1 and the rows add up to n
        self._seen = np.zeros((len(self.strategies), n), dtype=np.uint8)
        self._rows = np.zeros(len(self.strategies), dtype=np.int64)
        self._has_scores = np.zeros(len(self.strategies), dtype=bool)
        self._a = [
            {
                "unsafe_score": np.zeros(n),
                "code_scores": np.zeros((n, k)),  # apart from unsafe: flattened without a copy
                "named": np.zeros((n, k), dtype=bool),
                "uncertainty": np.full(n, np.nan),
                "top": np.full((n, 2), -1, dtype=np.int16),  # a code column: fewer than 2**15 codes
                "gate_unsafe": np.full(n, np.nan),
                "unsafe_in_output": np.zeros(n, dtype=bool),
                "tokens_forwarded": np.zeros(n, dtype=np.int32),
            }
            for _ in self.strategies
        ]

    def strategy_index(self, table: pa.Table) -> np.ndarray:
        return strategy_index(table, self.model, self.strategies)

    def add(self, table: pa.Table, positions: np.ndarray) -> None:
        """Place the rows of ``table`` (conformed columns of :data:`REDUCE_COLUMNS`, or fewer) at
        their samples' ``positions`` (n_rows,) int: each column turned into numpy once."""
        strat = self.strategy_index(table)
        cols = set(table.column_names)
        rows_of = [np.flatnonzero(strat == s) for s in range(len(self.strategies))]
        whole: dict[str, np.ndarray] = {}
        if "scores" in cols:
            sc = table.column("scores").combine_chunks()
            valid = pc.is_valid(sc).to_numpy(zero_copy_only=False)
            for s, rows in enumerate(rows_of):
                self._has_scores[s] |= bool(valid[rows].any())
            whole["unsafe_score"] = np.zeros(len(sc))
            whole["code_scores"] = np.zeros((len(sc), len(self.codes)))
            for j, lab in enumerate(self.labels):
                f = _struct_field(sc, lab)
                if f is None:
                    continue
                if j == 0:
                    whole["unsafe_score"][:] = _floats(f, 0.0)
                else:
                    whole["code_scores"][:, j - 1] = _floats(f, 0.0)
        if "pred_labels" in cols:
            whole["named"] = _code_matrix(table.column("pred_labels").combine_chunks(), self.codes)
        if "ranked" in cols:
            whole["top"] = _top2(table.column("ranked").combine_chunks(), self.codes)
        for name, fill in (("uncertainty", np.nan), ("gate_unsafe", np.nan), ("tokens_forwarded", 0)):
            if name in cols:
                whole[name] = _floats(table.column(name), fill)
        if "extra" in cols:
            f = _struct_field(table.column("extra").combine_chunks(), "unsafe_in_output")
            if f is not None:
                whole["unsafe_in_output"] = _floats(f, 0.0).astype(bool)
        for s, rows in enumerate(rows_of):
            pos = positions[rows]
            np.add.at(self._seen[s], pos, 1)
            self._rows[s] += len(pos)
            for name, values in whole.items():
                target = self._a[s][name]
                target[pos] = values[rows].astype(target.dtype, copy=False)

    def results(self) -> dict[str, StrategyResults]:
        """Per strategy its arrays; RecordError unless each has exactly one row per sample."""
        for s, name in enumerate(self.strategies):
            seen = self._seen[s]
            if self._rows[s] != self.n or not (seen == 1).all():
                what = "no" if (seen == 0).any() else "more than one"
                bad = np.flatnonzero(seen != 1)  # none where a sample's rows wrapped to one
                where = f"sample #{int(bad[0]) + 1}" if bad.size else "a sample"
                raise RecordError(
                    f"{self.model} / {name} has {int(self._rows[s])} predictions, not one for each of the {self.n} "
                    f"samples ({what} row for {where})"
                )
        return {
            name: StrategyResults(
                model=self.model,
                strategy=name,
                code_scores=a["code_scores"] if self._has_scores[s] else None,
                unsafe_score=a["unsafe_score"] if self._has_scores[s] else None,
                named=a["named"],
                uncertainty=a["uncertainty"],
                top=a["top"],
                gate_unsafe=a["gate_unsafe"],
                unsafe_in_output=a["unsafe_in_output"],
                tokens_forwarded=a["tokens_forwarded"],
            )
            for s, (name, a) in enumerate(zip(self.strategies, self._a))
        }


def score_matrix(scores: pa.Array | pa.ChunkedArray, labels: Sequence[str]) -> np.ndarray:
    """(rows, len(labels)) float from a ``scores`` struct column (no score, or no struct: 0)."""
    col = scores.combine_chunks() if isinstance(scores, pa.ChunkedArray) else scores
    out = np.zeros((len(col), len(labels)))
    for j, lab in enumerate(labels):
        f = _struct_field(col, lab)
        if f is not None:
            out[:, j] = _floats(f, 0.0)
    return out


def strategy_index(table: pa.Table, model: str, strategies: Sequence[str]) -> np.ndarray:
    """Each row's strategy as an index of ``strategies``; RecordError on another model or strategy."""
    if "model" in table.column_names and table.num_rows:
        models = pc.unique(table.column("model")).to_pylist()
        if models != [model]:
            other = next(m for m in models if m != model)
            raise RecordError(f"holds results of model {other!r}, not only of {model!r}")
    idx = pc.index_in(table.column("strategy"), value_set=pa.array(list(strategies), pa.string()))
    if idx.null_count:
        bad = table.column("strategy").filter(pc.is_null(idx))[0].as_py()
        raise RecordError(f"holds strategy {bad!r}, which the run does not compute")
    return idx.to_numpy(zero_copy_only=False).astype(np.int64)


def with_fitted_labels(
    table: pa.Table, strategy: np.ndarray, positions: np.ndarray, fitted: Sequence[StrategyResults | None], codes
) -> pa.Table:
    """``table`` with the ``pred_labels`` of the rows of fitted strategies set to their fitted codes.

    Args:
        strategy: (rows,) each row's strategy as an index of ``fitted``.
        positions: (rows,) each row's sample position.
        fitted: per strategy its fitted results, or None to keep the cells as they are.
    """
    old = table.column("pred_labels").combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(old), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.r_[0, np.cumsum(lengths)][:-1]  # each row's first value in the flattened cells
    pieces, base = [pc.list_flatten(old)], int(lengths.sum())
    for s, r in enumerate(fitted):
        rows = np.flatnonzero(strategy == s)
        if r is None or not len(rows):
            continue
        cells = r.pred_labels(positions[rows], codes)
        new_len = np.diff(cells.offsets.to_numpy())
        lengths[rows], starts[rows] = new_len, base + np.r_[0, np.cumsum(new_len)][:-1]
        pieces.append(cells.flatten())
        base += int(new_len.sum())
    values = pa.concat_arrays([p.cast(pa.string()) for p in pieces])
    offsets = np.r_[0, np.cumsum(lengths)]
    take = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])  # each new value's source
    cells = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values.take(pa.array(take)))
    return table.set_column(table.column_names.index("pred_labels"), "pred_labels", cells)


def positions_of(sample_ids: pa.Array | pa.ChunkedArray, ids: pa.Array, where: np.ndarray | None = None) -> np.ndarray:
    """Each row's sample as a position: its index in ``ids`` (``where[index]`` when given).

    Raises:
        RecordError: a row names a sample that is not in ``ids``.
    """
    idx = pc.index_in(sample_ids, value_set=ids)
    if idx.null_count:
        bad = pc.filter(sample_ids, pc.is_null(idx))[0].as_py()
        raise RecordError(f"sample {bad!r} is not one of the samples it should hold")
    pos = idx.to_numpy(zero_copy_only=False).astype(np.int64)
    return pos if where is None else where[pos]


def code_lists(matrix: np.ndarray, codes: Sequence[str]) -> pa.ListArray:
    """A list<string> per row: the codes where ``matrix`` (n, len(codes)) is true, in code order."""
    rows, cols = np.nonzero(matrix)
    offsets = np.r_[0, np.cumsum(matrix.sum(axis=1))].astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(list(codes), pa.string()).take(pa.array(cols)))


def label_matrix(labels: Sequence[Sequence[str]] | pa.Array, codes: Sequence[str]) -> np.ndarray:
    """(n, len(codes)) bool: which codes each sample is labelled with (other names ignored)."""
    col = labels if isinstance(labels, pa.Array | pa.ChunkedArray) else pa.array(list(labels), pa.list_(pa.string()))
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return _code_matrix(col, codes)
