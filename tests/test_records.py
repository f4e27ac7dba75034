"""Typed records (tier a, no model): the Parquet schema of predictions, legacy JSON-text cells,
the arrays of one model x strategy, and the manifest's round trip."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from tokmarg.columns import ModelArrays, label_matrix, positions_of
from tokmarg.records import (
    Manifest,
    ModelSummary,
    PartitionMeta,
    PartitionResult,
    RecordError,
    conform,
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
    ids = pa.array(["a", "b"])
    arrays = ModelArrays("m", ["token_probability", "LogTokU"], 2, LABELS)
    arrays.add(t, positions_of(t.column("sample_id"), ids))  # rows come back in the run's sample order
    res = arrays.results()
    tp = res["token_probability"]
    assert tp.unsafe_score.tolist() == [0.0, 0.0]  # no score counts as 0
    assert tp.code_scores.tolist() == [[0.0, 0.0], [0.75, 0.0]]
    assert tp.tokens_forwarded.tolist() == [1, 3]
    lt = res["LogTokU"]
    assert lt.code_scores is None and lt.unsafe_score is None
    assert lt.top.tolist() == [[0, 1], [1, 0]]  # S1, S2 as code columns 0, 1
    assert lt.gate_unsafe.tolist() == [1.0, 0.0] and lt.uncertainty.tolist() == [0.7, 0.5]
    lt.set_top_k(np.array([1, 0]))
    assert lt.named.tolist() == [[True, False], [False, False]]
    assert lt.pred_labels(np.array([1, 0]), ["S1", "S2"]).to_pylist() == [[], ["S1"]]
    lt.set_top_k(np.array([2, 2]))
    assert lt.pred_labels(np.array([0, 1]), ["S1", "S2"]).to_pylist() == [["S1", "S2"], ["S2", "S1"]]
    three = ModelArrays("m", ["token_probability", "LogTokU"], 3, LABELS)
    three.add(t, positions_of(t.column("sample_id"), pa.array(["a", "b", "c"])))
    with pytest.raises(RecordError, match="has 2 predictions, not one for each of the 3 samples"):
        three.results()
    with pytest.raises(RecordError, match="sample 'b' is not one of the samples"):
        positions_of(t.column("sample_id"), pa.array(["a", "c"]))
    with pytest.raises(RecordError, match="strategy 'LogTokU', which the run does not compute"):
        ModelArrays("m", ["token_probability"], 2, LABELS).add(t, np.zeros(4, dtype=np.int64))
    with pytest.raises(RecordError, match="model 'm', not only of 'other'"):
        ModelArrays("other", ["token_probability", "LogTokU"], 2, LABELS).add(t, np.zeros(4, dtype=np.int64))


def test_label_matrix_ignores_names_outside_the_codes() -> None:
    m = label_matrix([["S2", "S9"], [], ["S1", "S2"]], ["S1", "S2"])
    assert m.tolist() == [[False, True], [False, False], [True, True]]
    assert label_matrix([], ["S1"]).shape == (0, 1)


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
