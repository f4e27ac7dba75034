"""`tokmarg calibrate` on a run of the tiny local model (tier b): the policy file, its held-out
numbers against ones counted here from the predictions and the dataset, the objective on the
fitting folds, the tables, and bad input refused in one line with nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import precision_score, recall_score
from typer.testing import CliRunner

from tokmarg.cli import app
from tokmarg.metrics import expected_calibration_error
from tokmarg.policy.file import read_policy
from tokmarg.policy.fit import held_out_rows
from tokmarg.taxonomy import LLAMA_GUARD_3

runner = CliRunner()
CODES = list(LLAMA_GUARD_3.codes)
STRATEGIES = ("token_probability", "marginal_probability_at_any_place")
FIT = ["--folds", "3", "--min-positives", "3"]


@pytest.fixture(scope="module")
def run(labeled_run: dict) -> dict:
    return labeled_run


def _calibrate(run_dir: Path, *extra: str):
    return runner.invoke(app, ["calibrate", str(run_dir), *FIT, *extra])


def _raw(out: Path, model: str, strategy: str, ids: list[str]) -> np.ndarray:
    """(n, 15) raw scores ``unsafe``, S1..S14 of one strategy, read here from the predictions."""
    pred = pd.concat(pd.read_parquet(f) for f in (out / "predictions").glob("*.parquet"))
    g = pred[pred["strategy"] == strategy].set_index("sample_id").loc[ids]
    return np.array([[(s or {}).get(lab) or 0.0 for lab in ("unsafe", *CODES)] for s in g["scores"]])


def test_held_out_numbers_are_those_of_the_policy_applied_to_rows_it_did_not_fit(run: dict) -> None:
    res = _calibrate(run["out"])
    assert res.exit_code == 0, res.output
    assert "policy:" in res.output and "flagged" in res.output
    ids = [r["id"] for r in run["rows"]]
    y = np.array([[bool(r["labels"]), *(c in r["labels"] for c in CODES)] for r in run["rows"]])
    held = held_out_rows(ids, 3, 3)  # the run's seed
    assert 0 < held.sum() < len(ids)
    for strategy in STRATEGIES:
        files = list((run["out"] / "policies").glob(f"*__{strategy}.yaml"))
        assert len(files) == 1, files
        path = files[0]
        p = read_policy(path)
        assert p.strategy["name"] == strategy and p.calibration["seed"] == 3 and p.calibration["folds"] == 3
        assert p.dataset["rows"] == len(ids) and p.dataset["held_out_rows"] == held.sum()
        assert p.labels == ("unsafe", *CODES)
        assert len(p.model["sha256"]) == 64 and len(p.prompt["sha256"]) == 64
        assert {"config.json", "model.safetensors"} <= set(p.model["files"])
        raw = _raw(run["out"], run["model"], strategy, ids)
        fitted = [v for v in p.verdicts if v.fitted]
        assert {"unsafe", "S1", "S2"} <= {v.label for v in fitted}
        kept = pq.read_table(run["out"] / "calibration" / "held_out" / path.with_suffix(".parquet").name).to_pandas()
        assert list(kept["id"]) == [i for i, h in zip(ids, held) if h]
        for j, v in enumerate(p.verdicts):
            lab = v.label
            cal = v.map.apply(raw[held, j])
            if lab != "unsafe":
                np.testing.assert_allclose([c[lab] for c in kept["category_scores"]], cal, rtol=0, atol=1e-12)
            flag, truth = cal >= v.threshold, y[held, j]
            assert v.held_out["support"] == truth.sum() and v.held_out["flagged"] == flag.sum()
            if flag.any():
                assert v.held_out["precision"] == pytest.approx(precision_score(truth, flag, zero_division=0))
            if truth.any():
                assert v.held_out["recall"] == pytest.approx(recall_score(truth, flag))
            assert v.held_out["ece_before"] == pytest.approx(expected_calibration_error(truth, raw[held, j]))
            assert v.held_out["ece_after"] == pytest.approx(expected_calibration_error(truth, cal))
            if not v.fitted:
                assert v.map.kind == "identity" and v.threshold == 0.3 and "not fitted" in v.note
        flags = np.column_stack([v.map.apply(raw[held, j]) >= v.threshold for j, v in enumerate(p.verdicts)])
        assert list(kept["flagged"]) == list(flags.any(axis=1))
        truth_any = y[held, 1:].any(axis=1)
        assert p.flagged["held_out"]["recall"] == pytest.approx(recall_score(truth_any, flags.any(axis=1)))
    table = pd.read_csv(run["out"] / "calibration" / "thresholds.csv")
    assert set(table["strategy"]) == set(STRATEGIES)
    rel = pd.read_csv(run["out"] / "calibration" / "reliability.csv")
    assert set(rel["when"]) == {"before", "after"}
    # every (held-out sample, code) pair once per strategy and side
    assert (rel.groupby(["strategy", "when"])["n_pairs"].sum() == held.sum() * len(CODES)).all()


def test_precision_objective_holds_where_fitted_and_the_held_out_is_reported_beside_it(run: dict, tmp_path) -> None:
    out = tmp_path / "p.yaml"
    res = _calibrate(run["out"], "--objective", "precision>=0.9", "--strategies", STRATEGIES[0], "--out", str(out))
    assert res.exit_code == 0, res.output
    p = read_policy(out)
    assert p.calibration["objective"] == "precision>=0.9"
    ids = [r["id"] for r in run["rows"]]
    y = np.array([[bool(r["labels"]), *(c in r["labels"] for c in CODES)] for r in run["rows"]])
    held = held_out_rows(ids, 3, 3)
    raw = _raw(run["out"], run["model"], STRATEGIES[0], ids)
    for j, v in enumerate(p.verdicts):
        if not v.fitted:
            continue
        flag = v.map.apply(raw[~held, j]) >= v.threshold
        prec = y[~held, j][flag].mean() if flag.any() else float("nan")
        if v.objective_met:
            assert prec >= 0.9 and v.fit["precision"] == pytest.approx(prec)
        else:
            assert "not met" in v.note and not prec >= 0.9
        assert "precision" in v.held_out  # reported next to it, whatever it is
    # the run's thresholds table keeps the other strategy's rows and replaces this one's
    table = pd.read_csv(run["out"] / "calibration" / "thresholds.csv")
    assert set(table["strategy"]) == set(STRATEGIES)
    assert set(table.loc[table["strategy"] == STRATEGIES[0], "objective"].dropna()) == {"precision>=0.9"}


def _nothing_written(run_dir: Path, before: set[Path]) -> None:
    assert {p for p in run_dir.rglob("*")} == before


@pytest.mark.parametrize(
    "extra, msg",
    [
        (["--out", "x.yaml"], "names one policy file, but 2 model x strategy pairs"),
        (["--strategies", "greedy_generation"], "gives no scores to calibrate"),
        (["--strategies", "LogTokU"], "was not run"),
        (["--models", "other"], "is not a model of"),
        (["--objective", "precision>0.9"], "--objective"),
        (["--method", "spline"], "--method: 'spline' is not allowed"),
        (["--folds", "100000"], "leave no held-out rows"),
    ],
)
def test_bad_options_are_one_line_and_write_nothing(run: dict, tmp_path: Path, extra: list[str], msg: str) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run["out"], copy)
    before = set(copy.rglob("*"))
    res = _calibrate(copy, *extra)
    assert res.exit_code == 2 and msg in res.output and len(res.output.strip().splitlines()) == 1, res.output
    _nothing_written(copy, before)


def test_a_run_without_fingerprints_or_manifest_is_refused(run: dict, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run["out"], copy)
    for f in (copy / "partitions").rglob("*.parquet"):
        t = pq.read_table(f)
        meta = json.loads(t.schema.metadata[b"tokmarg"])
        for m in meta.get("partitions", [meta]):
            m["worker"].pop("model_sha256", None)
        pq.write_table(t.replace_schema_metadata({b"tokmarg": json.dumps(meta).encode()}), f)
    before = set(copy.rglob("*"))
    res = _calibrate(copy)
    assert res.exit_code == 2 and "records no fingerprint" in res.output, res.output
    _nothing_written(copy, before)
    (copy / "manifest.json").unlink()
    res = _calibrate(copy)
    assert res.exit_code == 2 and "not finished" in res.output, res.output


def test_the_report_shows_the_policies_thresholds_and_reliability_before_and_after(run: dict, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run["out"], copy)
    shutil.rmtree(copy / "calibration", ignore_errors=True)
    res = runner.invoke(app, ["report", str(copy), "--out", str(tmp_path / "plain")])
    assert res.exit_code == 0, res.output
    assert "Calibrated policies" not in (tmp_path / "plain" / "report.md").read_text(encoding="utf-8")
    assert _calibrate(copy).exit_code == 0
    res = runner.invoke(app, ["report", str(copy), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "rep" / "report.md").read_text(encoding="utf-8")
    assert "5.1 Calibrated policies" in md and "plots/reliability_calibrated.png" in md
    assert (tmp_path / "rep" / "plots" / "reliability_calibrated.png").stat().st_size > 1000
    summary = pd.read_csv(tmp_path / "rep" / "csv" / "policies.csv")
    assert set(summary["strategy"]) == set(STRATEGIES)
    codes = pd.read_csv(tmp_path / "rep" / "csv" / "policy_thresholds.csv")
    for _, row in summary.iterrows():
        p = read_policy(Path(row["policy"]))
        assert row["flagged precision"] == pytest.approx(p.flagged["held_out"]["precision"])
        assert row["held-out rows"] == p.dataset["held_out_rows"]
        mine = codes[codes["strategy"] == row["strategy"]].set_index("label")
        for v in p.verdicts:
            assert mine.at[v.label, "threshold"] == pytest.approx(v.threshold)
            assert mine.at[v.label, "ece_after"] == pytest.approx(v.held_out["ece_after"])
