"""Typed records between the worker, the run directory and the report.

A worker returns a :class:`PartitionResult`: the :class:`SampleOutput` of every strategy for
every sample of one partition, and a :class:`PartitionMeta` saying who computed it and at
what cost. The driver writes it as an Arrow table with :func:`prediction_schema` (SPEC §6):
``scores`` and ``unexplored_by_label`` are structs with one float per label of the run's
taxonomy (``unsafe`` first, null where the strategy gives the label no score), ``pred_labels``
and ``ranked`` lists of strings, ``extra`` a struct of the few per-strategy facts. No cell holds
JSON text, so pandas, polars and DuckDB read the files as they are.

:mod:`tokmarg.columns` reads them back as arrays. Files of runs written before the typed columns
(JSON-text cells) are read through :func:`conform`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields

import pyarrow as pa

from tokmarg.errors import TokmargError
from tokmarg.strategies import SampleOutput

# the per-strategy facts of SampleOutput.extra, by name and Arrow type
EXTRA_FIELDS: dict[str, pa.DataType] = {
    "unsafe_in_output": pa.float64(),  # greedy_generation: the output says unsafe (1.0) or not (0.0)
    "tree_nodes": pa.int64(),  # marginal_probability_at_any_place: nodes of the pruned tree
    "gate_unsafe_score": pa.float64(),  # uncertainty strategies: P(unsafe) of the safe/unsafe gate
}
LEGACY_JSON = ("scores", "unexplored_by_label", "extra")  # JSON-text columns of runs before the typed ones


class RecordError(TokmargError, ValueError):
    """A predictions table cannot be read as one; one line naming what is wrong."""


# Parquet options of prediction files: dictionary-encode the repeated strings only (trying it on the
# float columns made writing 3x slower for nothing); min/max statistics of the columns a reader
# selects rows by only (all columns' cost a quarter of the writing time: ~4 s of a 1M x 3 reduce)
PARQUET_OPTIONS = {
    "use_dictionary": [
        "model",
        "strategy",
        "greedy_text",
        "true_labels.list.element",
        "pred_labels.list.element",
        "ranked.list.element",
    ],
    "write_statistics": ["model", "strategy", "sample_id"],
}


def prediction_schema(labels: Sequence[str]) -> pa.Schema:
    """The columns of ``partitions/*/part-*.parquet`` and ``predictions/*.parquet``; ``labels``:
    ``unsafe`` + the taxonomy codes of the run."""
    scores = pa.struct([pa.field(label, pa.float64()) for label in labels])
    strings = pa.list_(pa.string())
    return pa.schema(
        [
            ("model", pa.string()),
            ("strategy", pa.string()),
            ("sample_id", pa.string()),
            ("true_labels", strings),
            ("scores", scores),
            ("pred_labels", strings),
            ("unexplored_mass", pa.float64()),
            ("unexplored_by_label", scores),
            ("greedy_text", pa.string()),
            ("uncertainty", pa.float64()),
            ("ranked", strings),
            ("gate_unsafe", pa.bool_()),
            ("tokens_forwarded", pa.int64()),
            ("extra", pa.struct([pa.field(k, t) for k, t in EXTRA_FIELDS.items()])),
            ("sample_tokens_forwarded", pa.int64()),
        ]
    )


def _known(cls: type, d: Mapping) -> dict:
    """The entries of ``d`` that are fields of ``cls`` (newer files may hold more)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass(frozen=True)
class PartitionMeta:
    """Who computed a partition and what it cost (stored in the partition file's metadata)."""

    model: str
    index: int
    seconds: dict[str, float]  # scoring wall time: "all" (fast engine) or per strategy (reference)
    tokens_forwarded: int  # for this partition, all strategies
    prefix_tokens: int  # shared prompt prefix prefilled once for this partition (fast engine)
    forward_calls: int  # model calls after the prefix (fast engine)
    worker: dict  # host, pid, device, dtype (the Ray launcher adds actor, node, GPUs)
    finished: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> PartitionMeta:
        if "tokens" in d and "tokens_forwarded" not in d:  # partitions written before the rename
            d = {**d, "tokens_forwarded": d["tokens"]}
        return cls(**_known(cls, d))


@dataclass
class PartitionResult:
    """One model's outputs for one partition: ``outputs[strategy][i]`` is sample ``i``'s."""

    meta: PartitionMeta
    sample_ids: tuple[str, ...]
    true_labels: tuple[tuple[str, ...], ...]
    outputs: dict[str, list[SampleOutput]]
    sample_tokens: tuple[int, ...]  # tokens forwarded per sample, all strategies together

    @property
    def model(self) -> str:
        return self.meta.model

    @property
    def index(self) -> int:
        return self.meta.index

    def table(self, labels: Sequence[str]) -> pa.Table:
        """The partition's rows, strategy by strategy, in :func:`prediction_schema`."""
        rows = [
            _row(self.model, s, sid, truth, out, tok, labels)
            for s, outs in self.outputs.items()
            for sid, truth, out, tok in zip(self.sample_ids, self.true_labels, outs, self.sample_tokens)
        ]
        return pa.Table.from_pylist(rows, schema=prediction_schema(labels))


def _labelled(values: Mapping[str, float] | None, labels: Sequence[str], what: str) -> dict | None:
    if values is None:
        return None
    unknown = set(values) - set(labels)
    if unknown:
        raise RecordError(f"{what} names labels outside the run's taxonomy: {sorted(unknown)}")
    return {k: float(v) for k, v in values.items()}


def _row(
    model: str, strategy: str, sid: str, truth: Sequence[str], o: SampleOutput, tokens: int, labels: Sequence[str]
) -> dict:
    unknown = set(o.extra) - set(EXTRA_FIELDS)
    if unknown:
        raise RecordError(f"{strategy}: extra facts without a column: {sorted(unknown)}")
    return {
        "model": model,
        "strategy": strategy,
        "sample_id": sid,
        "true_labels": list(truth),
        "scores": _labelled(o.scores, labels, f"{strategy} scores"),
        "pred_labels": list(o.pred_labels),
        "unexplored_mass": o.unexplored_mass,
        "unexplored_by_label": _labelled(o.unexplored_by_label, labels, f"{strategy} unexplored_by_label"),
        "greedy_text": o.greedy_text,
        "uncertainty": o.uncertainty,
        "ranked": None if o.ranked is None else list(o.ranked),
        "gate_unsafe": o.gate_unsafe,
        "tokens_forwarded": int(o.tokens_forwarded),
        "extra": dict(o.extra) if o.extra else None,
        "sample_tokens_forwarded": int(tokens),
    }


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def conform(table: pa.Table, labels: Sequence[str], columns: Sequence[str] | None = None) -> pa.Table:
    """``table`` in :func:`prediction_schema` (``labels``; only ``columns`` of it when given),
    JSON-text cells of an older run's file turned into the typed columns; a column the file lacks
    is null.

    Raises:
        RecordError: naming the column that cannot be read as its type.
    """
    schema = prediction_schema(labels)
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns])
    cols = []
    for f in schema:
        if f.name not in table.column_names:
            cols.append(pa.nulls(len(table), f.type))
            continue
        col = table.column(f.name)
        try:
            if f.name in LEGACY_JSON and _is_text(col.type):
                col = pa.array([None if s is None else json.loads(s) for s in col.to_pylist()], type=f.type)
            cols.append(col.cast(f.type))
        except (ValueError, TypeError, pa.ArrowException) as e:
            what = f"JSON objects of numbers for {list(labels)}" if f.name in LEGACY_JSON else str(f.type)
            raise RecordError(f"column {f.name!r}: not {what} ({str(e).splitlines()[0]})") from None
    return pa.Table.from_arrays(cols, schema=schema)


@dataclass
class ModelSummary:
    """What one model's partitions cost and where they ran (``manifest.json`` ``timing``)."""

    load_seconds: float | None = None  # the first of its workers that loaded
    partitions: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # "all" (fast) or per strategy (reference)
    prefix_tokens: int = 0  # the shared prefix prefilled once per partition
    prefix_tokens_total: int = 0
    tokens_forwarded: int = 0
    forward_calls: int = 0
    partitions_by_worker: dict[str, int] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)

    @property
    def scoring_seconds(self) -> float:
        return float(self.seconds["all"]) if "all" in self.seconds else float(sum(self.seconds.values()))

    @classmethod
    def of(cls, metas: Sequence[PartitionMeta], load_seconds: float | None) -> ModelSummary:
        where = [f"{m.worker.get('actor') or 'local'} on {_node(m)[:12]}" for m in metas]
        keys = sorted({k for m in metas for k in m.seconds})
        return cls(
            load_seconds=load_seconds,
            partitions=len(metas),
            seconds={k: float(sum(m.seconds.get(k, 0.0) for m in metas)) for k in keys},
            prefix_tokens=max((m.prefix_tokens for m in metas), default=0),
            prefix_tokens_total=int(sum(m.prefix_tokens for m in metas)),
            tokens_forwarded=int(sum(m.tokens_forwarded for m in metas)),
            forward_calls=int(sum(m.forward_calls for m in metas)),
            partitions_by_worker=dict(Counter(where)),
            nodes=sorted({_node(m) for m in metas}),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> ModelSummary:
        return cls(**_known(cls, d))


def _node(m: PartitionMeta) -> str:
    return m.worker.get("node_id") or m.worker.get("host", "?")


MANIFEST_KEYS = ("models", "strategies", "semantics", "engine", "dataset_sha256", "n_samples")


@dataclass
class Manifest:
    """``RUN/manifest.json``, written last: the run is complete (SPEC §6)."""

    models: list[str]
    strategies: list[str]
    semantics: str
    engine: str
    dataset_sha256: str
    n_samples: int
    command: str = ""
    calibration: str = "transductive"
    calibration_note: str = ""
    t_opti: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # model -> strategy -> t
    params_file: str = ""
    inputs_from: dict[str, str] | None = None  # params / dataset: command line, working directory or packaged
    params: dict = field(default_factory=dict)  # the params file as read
    resolved: dict = field(default_factory=dict)  # model -> prompt, taxonomy, device, dtype, params
    taxonomy: str = ""
    dataset: str = ""
    n_skipped: int = 0
    skipped: list = field(default_factory=list)
    exclude_codes: list[str] = field(default_factory=list)  # codes the run leaves out (prompts and labels)
    n_relabeled: int = 0  # samples whose labels of excluded codes were dropped
    partition_size: int = 0
    partitions: dict[str, int] = field(default_factory=dict)
    launch: dict = field(default_factory=dict)  # launcher, workers (one entry per model worker), placement
    timing: dict[str, ModelSummary] = field(default_factory=dict)
    tokens_forwarded: dict[str, int] = field(default_factory=dict)
    tables: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    machine: dict = field(default_factory=dict)
    started: str = ""
    finished: str = ""

    def to_dict(self) -> dict:
        return {**asdict(self), "timing": {m: t.to_dict() for m, t in self.timing.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> Manifest:
        """Read a manifest (older runs' too: ``launch.actors`` became ``launch.workers``).

        Raises:
            RecordError: a required key is missing.
        """
        missing = [k for k in MANIFEST_KEYS if k not in d]
        if missing:
            raise RecordError(f"missing key {missing[0]!r}")
        kw = _known(cls, d)
        kw["timing"] = {m: ModelSummary.from_dict(t) for m, t in (d.get("timing") or {}).items()}
        launch = dict(d.get("launch") or {})
        if "actors" in launch and "workers" not in launch:
            launch["workers"] = launch.pop("actors")
        kw["launch"] = launch
        return cls(**kw)

    @property
    def workers(self) -> list[dict]:
        return list(self.launch.get("workers", []))
