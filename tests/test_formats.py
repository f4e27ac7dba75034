"""Datasets in JSONL, Parquet and CSV, with a column mapping; read streamed (tiers a and b)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tokmarg.cli import app
from tokmarg.data import DataError, load_dataset
from tokmarg.sources import ColumnMap
from tokmarg.taxonomy import get_taxonomy
from tokmarg.worker import Partition

LG3 = get_taxonomy("llama_guard_3")
ROWS = [
    {"id": "a", "prompt": "how do I bake bread", "labels": []},
    {"id": "b", "prompt": "question two", "response": "an answer", "labels": ["S1", "S10"]},
    {"id": "c", "conversation": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
     "labels": ["S2"]},
    {"id": "d", "prompt": "more text, with a comma", "labels": ["S14"]},
    {"id": "e", "prompt": "five", "labels": []},
]  # fmt: skip
PARAMS = "strategies:\n  token_probability: {max_new_tokens: 3}\n  LogTokU: {}\n"
runner = CliRunner()


def _files(tmp: Path) -> dict[str, Path]:
    jsonl = tmp / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    frame = pd.DataFrame(
        {
            "id": [r["id"] for r in ROWS],
            "prompt": [r.get("prompt") for r in ROWS],
            "response": [r.get("response") for r in ROWS],
            "conversation": [r.get("conversation") for r in ROWS],
            "labels": [r["labels"] for r in ROWS],
        }
    )
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp / "d.parquet")
    csv = frame.assign(  # a CSV cell holds text: labels comma-separated, a conversation as JSON
        labels=[",".join(r["labels"]) for r in ROWS],
        conversation=[json.dumps(r["conversation"]) if "conversation" in r else None for r in ROWS],
    )
    csv.to_csv(tmp / "d.csv", index=False)
    return {"jsonl": jsonl, "parquet": tmp / "d.parquet", "csv": tmp / "d.csv"}


def test_the_three_formats_load_the_same_samples(tmp_path: Path) -> None:
    files = _files(tmp_path)
    loaded = {k: load_dataset(f, LG3) for k, f in files.items()}
    ref = loaded["jsonl"]
    assert ref.ids.to_pylist() == ["a", "b", "c", "d", "e"] and ref.true_codes()[1] == ("S1", "S10")
    for k, ds in loaded.items():
        assert ds.ids.equals(ref.ids) and (ds.labels == ref.labels).all(), k
        assert [(s.id, s.conversation, s.true_codes) for s in ds.samples] == [
            (s.id, s.conversation, s.true_codes) for s in ref.samples
        ], k
        assert [tuple(t.role for t in s.conversation) for s in ds.probes] == [("user",), ("user", "assistant")]
    # ranges read again from the file, in any order
    assert [s.id for s in ref.read(3, 5)] == ["d", "e"] and [s.id for s in ref.read(0, 2)] == ["a", "b"]
    assert [s.id for s in loaded["csv"].read(2, 4)] == ["c", "d"] and [s.id for s in loaded["csv"].read(1, 2)] == ["b"]
    part = Partition(1, 2, 4, True, loaded["parquet"])
    sent = pickle.loads(pickle.dumps(part))  # as Ray sends it: with its samples, without the dataset
    assert sent.dataset is None and [s.id for s in sent.samples] == ["c", "d"]


def test_one_hot_columns_and_a_column_mapping(tmp_path: Path) -> None:
    f = tmp_path / "onehot.csv"
    f.write_text("uid,text,violent,hate\n1,first,1,0\n2,second,0,0\n3,third,true,1\n", encoding="utf-8")
    cmap = ColumnMap({"id": "uid", "prompt": "text"}, {"S1": "violent", "S10": "hate"})
    ds = load_dataset(f, LG3, columns=cmap)
    assert ds.ids.to_pylist() == ["1", "2", "3"]  # a numeric id column reads as text
    assert ds.true_codes() == [("S1",), (), ("S1", "S10")]
    f.write_text("uid,text,violent,hate\n1,first,1,0\n2,second,2,0\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"onehot\.csv: row 2: column 'violent': 2 is not 0 or 1$"):
        load_dataset(f, LG3, columns=cmap)
    g = tmp_path / "named.parquet"
    pq.write_table(pa.table({"q": ["x", "y"], "cats": ["S1, S2", "S99"]}), g)
    with pytest.raises(DataError, match=r"named\.parquet: row 2: unknown code 'S99'"):
        load_dataset(g, LG3, columns=ColumnMap({"prompt": "q"}, "cats"))
    ds = load_dataset(g, LG3, columns=ColumnMap({"prompt": "q"}, "cats"), skip_invalid=True)
    assert ds.true_codes() == [("S1", "S2")] and ds.n_skipped == 1


def test_params_dataset_mapping_and_bad_files_in_one_line(tmp_path: Path) -> None:
    data = tmp_path / "t.csv"
    data.write_text("text,category\nfirst,S1\nsecond,\n", encoding="utf-8")
    params = tmp_path / "p.yaml"
    params.write_text(PARAMS + "dataset: {prompt: text, labels: category}\n", encoding="utf-8")
    res = runner.invoke(app, ["validate", "--dataset", str(data), "--params", str(params)])
    assert res.exit_code == 0, res.output
    assert "2 samples, 1 safe, 1 unsafe, 0 skipped" in res.output and "S1 1, S2 0" in res.output
    params.write_text(PARAMS + "dataset: {prompt: text, labels: {S99: x}}\n", encoding="utf-8")
    res = runner.invoke(app, ["validate", "--dataset", str(data), "--params", str(params)])
    assert res.exit_code == 2 and "dataset.labels.S99: not a code" in res.output
    params.write_text(PARAMS + "dataset: {prompt: words, labels: category}\n", encoding="utf-8")
    res = runner.invoke(app, ["validate", "--dataset", str(data), "--params", str(params)])
    assert res.exit_code == 2 and "t.csv" in res.output and "words" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    for name, body, expected in (
        ("x.txt", "{}", "cannot tell the format from the extension '.txt'"),
        ("bad.parquet", "not parquet", "not a readable PARQUET file"),
    ):
        (tmp_path / name).write_text(body, encoding="utf-8")
        res = runner.invoke(app, ["validate", "--dataset", str(tmp_path / name)])
        assert res.exit_code == 2 and expected in res.output and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["validate", "--dataset", str(tmp_path / "x.txt"), "--format", "yaml"])
    assert res.exit_code == 2 and "--format: 'yaml' is not allowed; allowed: jsonl, parquet, csv" in res.output
    (tmp_path / "rows.txt").write_text(json.dumps(ROWS[0]) + "\n", encoding="utf-8")
    res = runner.invoke(app, ["validate", "--dataset", str(tmp_path / "rows.txt"), "--format", "jsonl"])
    assert res.exit_code == 0 and "1 samples" in res.output


def test_the_same_rows_in_three_formats_give_the_same_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    files = _files(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS, encoding="utf-8")
    runs = {}
    for k, f in files.items():
        out = tmp_path / f"run-{k}"
        args = ["eval", "--models", str(tiny_model_dir), "--dataset", str(f), "--params", str(params)]
        res = runner.invoke(app, [*args, "--out", str(out), "--no-ray", "--no-progress", "--no-report"])
        assert res.exit_code == 0, res.output
        runs[k] = out
    key = ["strategy", "sample_id"]
    ref_pred = pd.read_parquet(next((runs["jsonl"] / "predictions").glob("*.parquet"))).sort_values(key)
    ref_metrics = pd.read_csv(runs["jsonl"] / "metrics.csv").drop(columns="seconds_per_sample")
    for k in ("parquet", "csv"):
        pred = pd.read_parquet(next((runs[k] / "predictions").glob("*.parquet"))).sort_values(key)
        pd.testing.assert_frame_equal(pred.reset_index(drop=True), ref_pred.reset_index(drop=True))
        metrics = pd.read_csv(runs[k] / "metrics.csv").drop(columns="seconds_per_sample")
        pd.testing.assert_frame_equal(metrics, ref_metrics)
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,labels\nfine,S1\nworse,S77\n", encoding="utf-8")
    out = tmp_path / "run-bad"
    res = runner.invoke(app, ["eval", "--models", str(tiny_model_dir), "--dataset", str(bad), "--out", str(out)])
    assert res.exit_code == 2 and "bad.csv: row 2: unknown code 'S77'" in res.output and not out.exists()
