"""Typed records (tier a, no model): the Parquet schema of predictions, legacy JSON-text cells,
the arrays of one model x strategy, and the manifest's round trip."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from tokmarg.records import (
    Manifest,
    ModelSummary,
    PartitionMeta,
    PartitionResult,
    RecordError,
    conform,
    strategy_results,
    with_pred_labels,
)
from tokmarg.strategies import SampleOutput

LABELS = ("unsafe", "S1", "S2")


def _result() -> PartitionResult:
    outs = {
        "token_probability": [SampleOutput({"S1": 0.75}, tokens_forwarded=3), SampleOutput(None, tokens_forwarded=1)],
        "LogTokU": [
            SampleOutput(uncertainty=0.5, ranked=("S2", "S1"), gate_unsafe=False, extra={"gate_unsafe_score": 0.25}),
            SampleOutput(uncertainty=0.7, ranked=("S1", "S2"), gate_unsafe=True, extra={"gate_unsafe_score": 0.75}),
        ],
    }
    meta = PartitionMeta("m", 0, {"all": 2.0}, 4, 7, 2, {"host": "h"})
    return PartitionResult(meta, ("b", "a"), (("S1",), ()), outs, (3, 1))


def test_partition_table_is_typed_and_read_back_as_arrays() -> None:
    t = _result().table(LABELS)
    assert t.schema.field("scores").type == pa.struct([(label, pa.float64()) for label in LABELS])
    assert t.column("scores").to_pylist()[:2] == [{"unsafe": None, "S1": 0.75, "S2": None}, None]
    res = strategy_results(t, ["a", "b"], LABELS)  # rows come back in the run's sample order
    tp = res["m", "token_probability"]
    assert tp.scores.tolist() == [[0.0, 0.0, 0.0], [0.0, 0.75, 0.0]]  # no score counts as 0
    assert tp.tokens_forwarded.tolist() == [1, 3] and tp.rows.tolist() == [1, 0]
    lt = res["m", "LogTokU"]
    assert lt.scores is None and lt.ranked == [("S1", "S2"), ("S2", "S1")]
    assert lt.gate_unsafe.tolist() == [1.0, 0.0] and lt.uncertainty.tolist() == [0.7, 0.5]
    lt.pred_labels = [("S1",), ()]
    assert with_pred_labels(t, [lt]).column("pred_labels").to_pylist() == [[], [], [], ["S1"]]
    with pytest.raises(RecordError, match="has 2 predictions, not one for each of the 3 samples"):
        strategy_results(t, ["a", "b", "c"], LABELS)


def test_unknown_labels_and_facts_are_refused() -> None:
    r = _result()
    r.outputs["token_probability"][0].scores = {"S9": 0.1}
    with pytest.raises(RecordError, match=r"token_probability scores names labels outside .*\['S9'\]"):
        r.table(LABELS)


def test_legacy_json_cells_are_conformed() -> None:
    t = _result().table(LABELS)
    cells = [
        None if v is None else json.dumps({k: x for k, x in v.items() if x is not None})
        for v in t["scores"].to_pylist()
    ]
    old = t.set_column(t.column_names.index("scores"), "scores", pa.array(cells, pa.large_string()))
    assert conform(old, LABELS).equals(t)
    bad = t.set_column(t.column_names.index("scores"), "scores", pa.array(["{", *cells[1:]]))
    with pytest.raises(RecordError, match="column 'scores': not JSON objects of numbers"):
        conform(bad, LABELS)


def test_manifest_round_trip_and_older_manifests() -> None:
    m = Manifest(
        models=["m"], strategies=["LogTokU"], semantics="exact", engine="fast", dataset_sha256="x", n_samples=2,
        timing={"m": ModelSummary.of([_result().meta], 1.5)}, launch={"workers": [{"model": "m"}]},
    )  # fmt: skip
    assert Manifest.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    assert m.timing["m"].tokens_forwarded == 4 and m.timing["m"].scoring_seconds == 2.0
    old = {**m.to_dict(), "launch": {"actors": [{"model": "m"}]}}  # written before launch.workers
    assert Manifest.from_dict(old).workers == [{"model": "m"}]
    assert (
        PartitionMeta.from_dict({**_result().meta.to_dict(), "tokens": 9, "tokens_forwarded": 9}).tokens_forwarded == 9
    )
    with pytest.raises(RecordError, match="missing key 'engine'"):
        Manifest.from_dict({k: v for k, v in m.to_dict().items() if k != "engine"})
    assert np.isclose(ModelSummary.from_dict(m.timing["m"].to_dict()).load_seconds, 1.5)
