"""Runs at scale, small (tier b, no model): a synthetic finished run is reduced and reported;
the reduce reads partitions column-wise whatever their grouping in files; fitted codes are
written back into the predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from tokmarg.cli import app
from tokmarg.columns import StrategyResults, with_fitted_labels
from tokmarg.rundir import RunDir, parquet_meta, write_table
from tokmarg.scalerun import write_run

runner = CliRunner()


def _reduce(run: Path) -> pd.DataFrame:
    res = runner.invoke(app, ["eval", "--resume", str(run), "--no-ray", "--no-report", "--no-progress"])
    assert res.exit_code == 0, res.output
    return pd.read_csv(run / "metrics.csv")


def _split_files(run: Path) -> None:
    """Rewrite every grouped partition file as one file per partition (the older layout)."""
    rd = RunDir(run)
    for folder in (run / "partitions").iterdir():
        for f in sorted(folder.glob("part-*.parquet")):
            table, metas = rd.read_partition_file(f, pq.read_schema(f).names)
            f.unlink()
            ids = table.column("sample_id").to_pylist()
            for m in metas:  # ids are s0, s1, ...; partitions of 32 samples
                mine = [i for i, s in enumerate(ids) if int(s[1:]) // 32 == m.index]
                write_table(table.take(pa.array(mine)), rd.part_path(m.model, m.index), m.to_dict())


def test_a_synthetic_run_reduces_and_reports_the_same_in_any_file_layout(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", samples=150, models=2, seed=3)
    job = json.loads((run / "run.json").read_text())["job"]
    assert job["n_samples"] == 150 and len(job["models"]) == 2
    files = list((run / "partitions").glob("*/part-*.parquet"))
    assert len(files) == 2 and len(parquet_meta(files[0])["partitions"]) == 5  # 150 samples / 32 a partition
    labels = [json.loads(line)["labels"] for line in (run / "data.jsonl").read_text().splitlines()]
    assert 0.3 < sum(not lab for lab in labels) / len(labels) < 0.7  # about half safe
    grouped = _reduce(run)
    assert len(grouped) == 2 * 7 and (grouped["f1_micro_ci_method"] == "bootstrap").all()
    better = grouped.set_index(["model", "strategy"])["roc_auc_micro"]
    assert better["synthetic/model-2", "token_probability"] > better["synthetic/model-1", "token_probability"]
    pred_grouped = pd.read_parquet(run / "predictions" / "synthetic_model-1.parquet")

    (run / "manifest.json").unlink()
    _split_files(run)
    assert len(list((run / "partitions").glob("*/part-*.parquet"))) == 2 * 5
    split = _reduce(run)
    cols = [c for c in grouped.columns if c != "seconds_per_sample"]
    pd.testing.assert_frame_equal(grouped[cols], split[cols])
    pred_split = pd.read_parquet(run / "predictions" / "synthetic_model-1.parquet")
    key = ["strategy", "sample_id"]
    a = pred_grouped.sort_values(key).reset_index(drop=True)
    b = pred_split.sort_values(key).reset_index(drop=True)
    assert a["pred_labels"].map(list).tolist() == b["pred_labels"].map(list).tolist()
    fitted = a[a["strategy"] == "LogTokU"]
    assert {len(p) for p in fitted["pred_labels"]} <= {0, 1, 2} and any(len(p) == 2 for p in fitted["pred_labels"])
    tops = [list(r[: len(p)]) for r, p in zip(fitted["ranked"], fitted["pred_labels"])]
    assert tops == fitted["pred_labels"].map(list).tolist()  # the fitted codes are the best-ranked ones

    res = runner.invoke(app, ["report", str(run)])
    assert res.exit_code == 0, res.output
    curves = pd.read_csv(run / "report" / "csv" / "f1_threshold_curves.csv")
    stored = pd.read_csv(run / "curves" / "f1_threshold_curves.csv")
    assert len(curves) == 2 * 3 * 101 and set(curves["strategy"]) == set(stored["strategy"])
    assert "seeded row bootstrap, 1000 resamples" in (run / "report" / "report.md").read_text()


def test_fitted_labels_replace_only_the_fitted_strategies_cells() -> None:
    table = pa.table(
        {
            "strategy": ["a", "b", "a", "b"],
            "pred_labels": pa.array([["S2"], [], None, ["S1"]], pa.list_(pa.string())),
        }
    )
    r = StrategyResults(
        "m", "b", None, np.zeros((2, 2), bool), np.zeros(2), np.array([[1, 0], [0, -1]]), np.zeros(2),
        np.zeros(2, bool), np.zeros(2, int),
    )  # fmt: skip
    r.set_top_k(np.array([2, 1]))
    out = with_fitted_labels(table, np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1]), [None, r], ["S1", "S2"])
    assert out.column("pred_labels").to_pylist() == [["S2"], ["S2", "S1"], [], ["S1"]]


def test_a_small_file_with_another_models_rows_is_named_though_files_are_read_together(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", samples=100, models=1, seed=4)
    _split_files(run)  # four small files, read as one batch
    bad = sorted((run / "partitions").glob("*/part-*.parquet"))[2]
    t = pq.read_table(bad)
    t = t.set_column(t.schema.get_field_index("model"), "model", pa.array(["other"] * t.num_rows))
    pq.write_table(t, bad)
    res = runner.invoke(app, ["eval", "--resume", str(run), "--no-ray", "--no-report", "--no-progress"])
    assert res.exit_code != 0
    assert f"{bad}: holds results of model 'other'" in res.output and "Traceback" not in res.output
    assert not (run / "metrics.csv").exists()


def test_a_resume_reads_the_scan_the_run_kept_not_the_dataset(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    from tokmarg import data, scanindex

    run = write_run(tmp_path / "run", samples=70, models=1, seed=2)
    first = _reduce(run)
    assert (run / scanindex.INDEX_FILE).is_file()

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the dataset's rows were read again")

    monkeypatch.setattr(data, "rows", no_reading)
    (run / "manifest.json").unlink()
    again = _reduce(run)
    cols = [c for c in first.columns if c != "seconds_per_sample"]
    pd.testing.assert_frame_equal(first[cols], again[cols])
    (run / "data.jsonl").write_text((run / "data.jsonl").read_text() + "\n")  # another file: read again
    res = runner.invoke(app, ["eval", "--resume", str(run), "--no-ray", "--no-report", "--no-progress"])
    assert res.exit_code != 0 and "the dataset's rows were read again" in repr(res.exception)


def _results(strategy: str, y: np.ndarray, seed: int) -> StrategyResults:
    """Random results of one strategy over labels ``y``, fitted as the reduce fits them."""
    from tokmarg.reduce import fit_uncertainty

    rng = np.random.default_rng(seed)
    n, k = y.shape
    r = StrategyResults(
        "m", strategy, np.clip(0.5 * y + 0.6 * rng.random((n, k)), 0, 1), rng.random((n, k)) < 0.2, rng.random(n),
        np.argsort(-rng.random((n, k)), axis=1)[:, :2].astype(np.int16), np.full(n, np.nan), np.zeros(n, bool),
        np.ones(n, np.int32), unsafe_score=rng.random(n),
    )  # fmt: skip
    fit_uncertainty({strategy: r}, y, "transductive", 0)
    return r


def test_what_the_metrics_do_not_read_is_freed_without_changing_them() -> None:
    from tokmarg.reduce import metrics_row
    from tokmarg.strategies import REGISTRY

    y = np.random.default_rng(8).random((300, 3)) < 0.3
    for strategy in ("token_probability", "greedy_generation", "LogTokU"):
        whole, slim = _results(strategy, y, 1), _results(strategy, y, 1)
        slim.drop_unused(REGISTRY[strategy].kind.thresholded)
        assert slim.uncertainty.size == 0 and (slim.top.size == 0) == (slim.keep is None)
        assert (slim.named.size == 0) == REGISTRY[strategy].kind.thresholded
        a = metrics_row(whole, y, ["S1", "S2", "S3"], 0.4, True, 0, n_boot=50)
        b = metrics_row(slim, y, ["S1", "S2", "S3"], 0.4, True, 0, n_boot=50)
        assert a.keys() == b.keys() and all(str(a[key]) == str(b[key]) for key in a), strategy


def test_rows_find_their_samples_in_the_order_written_or_any_other() -> None:
    import pytest

    from tokmarg.records import RecordError
    from tokmarg.reduce import Truth

    truth = Truth(pa.array([f"s{i}" for i in range(10)]), np.zeros((10, 2), bool), np.array([[0, 4], [4, 7], [7, 10]]))
    in_order = pa.chunked_array([pa.array(["s7", "s8"]), pa.array(["s9", "s0", "s1", "s2", "s3"])])
    assert truth.positions(in_order, [2, 0]).tolist() == [7, 8, 9, 0, 1, 2, 3]
    shuffled = pa.array(["s9", "s0", "s8", "s3", "s7", "s1", "s2"])
    assert truth.positions(shuffled, [2, 0]).tolist() == [9, 0, 8, 3, 7, 1, 2]
    with pytest.raises(RecordError, match="'s5' is not one of the samples"):
        truth.positions(pa.array(["s9", "s5", "s8"]), [2])
    with pytest.raises(RecordError, match="partition 3, which this run does not have"):
        truth.positions(in_order, [3])
