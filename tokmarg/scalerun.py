"""A finished run of any size without a model: the scale benchmark of the reduce and the report.

``python -m tokmarg.synthetic run OUT --samples N --models K [--seed S]`` writes into ``OUT`` a
dataset file (about half the rows safe, the others 1-3 codes), a params file, ``run.json`` as
``tokmarg eval`` writes it for those inputs, and every partition of every model in the exact
partition schema and file grouping of :class:`~tokmarg.rundir.PartitionWriter`, with seeded
scores correlated with the labels. ``tokmarg eval --resume OUT --no-ray`` then reduces it (the
manifest, metrics and tables) and ``tokmarg report OUT`` reports it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from tokmarg.records import EXTRA_FIELDS, PartitionMeta, prediction_schema
from tokmarg.rundir import FORMAT, PartitionWriter, RunDir, RunError, atomic_write, now, plan, write_partition_file
from tokmarg.strategies import REGISTRY

PARAMS = Path(__file__).parent / "defaults" / "params.yaml"


def _dataset(path: Path, n: int, codes: list[str], rng: np.random.Generator) -> np.ndarray:
    """Write ``n`` rows of JSONL; returns their (n, len(codes)) labels."""
    y = np.zeros((n, len(codes)), dtype=bool)
    unsafe = rng.random(n) < 0.5
    how_many = rng.integers(1, 4, size=n)
    for j in range(3):
        pick = unsafe & (how_many > j)
        y[np.flatnonzero(pick), rng.integers(0, len(codes), size=int(pick.sum()))] = True
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            labels = [codes[j] for j in np.flatnonzero(y[i])]
            f.write(json.dumps({"id": f"s{i}", "prompt": f"synthetic prompt {i}", "labels": labels}) + "\n")
    return y


def _struct(values: np.ndarray, labels: list[str]) -> pa.StructArray:
    return pa.StructArray.from_arrays([pa.array(values[:, j]) for j in range(len(labels))], names=labels)


def _lists(matrix: np.ndarray, codes: pa.Array, order: np.ndarray | None = None) -> pa.ListArray:
    """A list<string> per row: the codes where ``matrix`` is true (in ``order`` of columns if given)."""
    if order is not None:
        matrix = np.take_along_axis(matrix, order, axis=1)
    rows, cols = np.nonzero(matrix)
    idx = cols if order is None else order[rows, cols]
    offsets = np.r_[0, np.cumsum(matrix.sum(axis=1))].astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), codes.take(pa.array(idx, pa.int64())))


def _columns(strategy: str, y: np.ndarray, skill: float, rng: np.random.Generator, labels: list[str]) -> dict:
    """Seeded outputs of one strategy for rows with labels ``y``: evidence = skill x label + noise."""
    n, k = y.shape
    codes = pa.array(labels[1:], pa.string())
    evidence = skill * y + rng.normal(0.0, 1.0, size=(n, k))
    p = 1.0 / (1.0 + np.exp(-(evidence - 2.0)))
    unsafe = y.any(axis=1)
    p_unsafe = 1.0 / (1.0 + np.exp(-(skill * unsafe + rng.normal(0.0, 1.0, size=n) - skill / 2)))
    kind = REGISTRY[strategy].kind
    none = pa.nulls(n, pa.struct([pa.field(lab, pa.float64()) for lab in labels]))
    out: dict = {
        "scores": none,
        "pred_labels": pa.array([[]] * n, pa.list_(pa.string())) if kind.thresholded else None,
        "extra": None,
    }
    if kind.thresholded:
        out["scores"] = _struct(np.column_stack([p_unsafe, p]), labels)
    elif kind.fitted:
        gate = p_unsafe > 0.5
        out["scores"] = _struct(np.column_stack([p_unsafe, p * p_unsafe[:, None]]), labels)
        out["pred_labels"] = pa.array([[]] * n, pa.list_(pa.string()))
        out["uncertainty"] = pa.array(rng.normal(0.0, 1.0, size=n) - 0.5 * y.sum(axis=1))
        out["ranked"] = _lists(np.ones((n, k), dtype=bool), codes, np.argsort(-evidence, axis=1))
        out["gate_unsafe"] = pa.array(gate)
        out["extra"] = {"gate_unsafe_score": p_unsafe}
    else:  # names codes: those whose evidence passes
        named = p >= 0.5
        out["pred_labels"] = _lists(named, codes)
        out["greedy_text"] = pa.array(np.where(named.any(axis=1), "unsafe", "safe").astype(object), pa.string())
        out["extra"] = {"unsafe_in_output": named.any(axis=1).astype(float)}
    return out


def _table(model: str, strategy: str, ids: pa.Array, y: np.ndarray, cols: dict, tokens: np.ndarray, labels) -> pa.Table:
    schema = prediction_schema(labels)
    n = len(ids)
    extra_type = schema.field("extra").type
    extra = cols.get("extra")
    extra_arr = (
        pa.nulls(n, extra_type)
        if extra is None
        else pa.StructArray.from_arrays(
            [pa.array(extra[f]) if f in extra else pa.nulls(n, t) for f, t in EXTRA_FIELDS.items()],
            fields=list(extra_type),
        )
    )
    data = {
        "model": pa.array([model]).take(pa.array(np.zeros(n, dtype=np.int64))),
        "strategy": pa.array([strategy]).take(pa.array(np.zeros(n, dtype=np.int64))),
        "sample_id": ids,
        "true_labels": _lists(y, pa.array(labels[1:], pa.string())),
        "scores": cols["scores"],
        "pred_labels": cols["pred_labels"],
        "unexplored_mass": pa.nulls(n, pa.float64()),
        "unexplored_by_label": pa.nulls(n, schema.field("unexplored_by_label").type),
        "greedy_text": cols.get("greedy_text", pa.nulls(n, pa.string())),
        "uncertainty": cols.get("uncertainty", pa.nulls(n, pa.float64())),
        "ranked": cols.get("ranked", pa.nulls(n, pa.list_(pa.string()))),
        "gate_unsafe": cols.get("gate_unsafe", pa.nulls(n, pa.bool_())),
        "tokens_forwarded": pa.array(tokens),
        "extra": extra_arr,
        "sample_tokens_forwarded": pa.array(tokens * 3),
    }
    return pa.Table.from_arrays([data[f.name] for f in schema], schema=schema)


def write_run(out: Path, samples: int, models: int, seed: int = 0, per_file: int | None = None) -> Path:
    """Write the finished (scored, not yet reduced) run; returns ``out``. ``per_file``: partitions
    per file (default: as :class:`~tokmarg.rundir.PartitionWriter` groups them; 1 writes the layout
    of runs before the grouping, which older tokmarg versions read)."""
    from tokmarg.config import build_config
    from tokmarg.runner import job_of, load_inputs
    from tokmarg.settings import from_options

    if samples < 1 or models < 1:
        raise RunError("--samples and --models must be >= 1")
    if out.exists() and any(out.iterdir()):
        raise RunError(f"{out}: exists and is not empty; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    params = out / "params.yaml"
    shutil.copyfile(PARAMS, params)
    names = [f"synthetic/model-{i + 1}" for i in range(models)]
    labels = list(build_config(params, names).taxonomy.labels)
    y = _dataset(out / "data.jsonl", samples, labels[1:], rng)
    opts = {"models": names, "params": params, "dataset": out / "data.jsonl", "out": out, "no_ray": True}
    settings = from_options(opts, command=f"python -m tokmarg.synthetic run {out}")
    cfg, ds = load_inputs(settings)
    record = {
        "format": FORMAT,
        "args": settings.record(),
        "job": job_of(cfg, ds, settings),
        "command": settings.command,
    }
    rd = RunDir(out)
    atomic_write(rd.run_file, (json.dumps({**record, "created": now()}, indent=2, default=str) + "\n").encode())
    ids = ds.ids
    del ds
    bounds = plan(samples, settings.partition_size)
    per_file = per_file or max(1, PartitionWriter.GROUP_SAMPLES // settings.partition_size)
    for m, model in enumerate(names):
        skill = 2.0 + m  # models of different quality
        for g in range(0, len(bounds), per_file):
            group = list(range(g, min(g + per_file, len(bounds))))
            a, b = bounds[group[0]][0], bounds[group[-1]][1]
            tokens = rng.integers(20, 60, size=b - a)
            tables = [
                _table(model, s, ids.slice(a, b - a), y[a:b], _columns(s, y[a:b], skill, rng, labels), tokens, labels)
                for s in cfg.strategies
            ]
            metas = [
                PartitionMeta(model, i, {"all": 0.1 * (bounds[i][1] - bounds[i][0])}, 0, 100, 3, _WORKER).to_dict()
                for i in group
            ]
            write_partition_file(rd.part_path(model, group[0]), metas, pa.concat_tables(tables))
    return out


_WORKER = {"host": "synthetic", "pid": 0, "device": "cpu", "dtype": "float32"}
