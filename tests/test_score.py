"""`tokmarg score` and `Scorer` (tier b): a policy calibrated on a run of the tiny model, applied
to the same rows without labels, gives the held-out scores calibrate computed; --evaluate gives
the policy's held-out numbers again; the moderation JSONL's shape; a model, prompt, taxonomy or
strategy parameters that differ from the policy's are refused in one line with nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tokmarg.cli import app
from tokmarg.data import parse_line
from tokmarg.policy.file import read_policy
from tokmarg.scorer import Scorer, ScorerError
from tokmarg.taxonomy import LLAMA_GUARD_3

runner = CliRunner()
CODES = list(LLAMA_GUARD_3.codes)
STRATEGIES = ("token_probability", "marginal_probability_at_any_place")


@pytest.fixture(scope="module")
def cal(labeled_run: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("score")
    run = d / "run"
    shutil.copytree(labeled_run["out"], run)
    res = runner.invoke(app, ["calibrate", str(run), "--folds", "3", "--min-positives", "3", "--method", "platt"])
    assert res.exit_code == 0, res.output
    unlabeled = d / "unlabeled.jsonl"
    rows = [{k: v for k, v in r.items() if k != "labels"} for r in labeled_run["rows"]]
    unlabeled.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    policies = {s: next((run / "policies").glob(f"*__{s}.yaml")) for s in STRATEGIES}
    return {**labeled_run, "d": d, "run": run, "unlabeled": unlabeled, "policies": policies}


@pytest.fixture(scope="module")
def alone(cal: dict) -> dict:
    """A run of the tree strategy alone: scoring computes only it, so the batches match the run's
    (beside other strategies the tree's raw scores move in the 8th digit: float32 forwards of
    other shapes)."""
    run = cal["d"] / "alone"
    args = ["eval", "--models", cal["model"], "--dataset", str(cal["dir"] / "data.jsonl"), "--params"]
    args += [str(cal["dir"] / "params.yaml"), "--strategies", STRATEGIES[1], "--out", str(run)]
    res = runner.invoke(app, [*args, "--no-progress", "--no-ray", "--no-report"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["calibrate", str(run), "--folds", "3", "--min-positives", "3", "--method", "platt"])
    assert res.exit_code == 0, res.output
    return {**cal, "run": run, "policies": {STRATEGIES[1]: next((run / "policies").glob("*.yaml"))}}


def _score(policy: Path, data: Path, out: Path, *extra: str):
    args = ["score", "--policy", str(policy), "--dataset", str(data), "--out", str(out), "--no-ray", "--no-progress"]
    return runner.invoke(app, [*args, *extra])


def _held_out(cal: dict, strategy: str) -> pd.DataFrame:
    name = cal["policies"][strategy].with_suffix(".parquet").name
    return pq.read_table(cal["run"] / "calibration" / "held_out" / name).to_pandas().set_index("id")


@pytest.mark.parametrize("strategy, fixture", [(STRATEGIES[0], "cal"), (STRATEGIES[1], "alone")])
def test_scoring_the_rows_without_labels_gives_the_held_out_scores_calibrate_computed(
    strategy: str, fixture: str, request: pytest.FixtureRequest
) -> None:
    cal = request.getfixturevalue(fixture)
    out = cal["d"] / f"scores-{fixture}-{strategy}"
    res = _score(cal["policies"][strategy], cal["unlabeled"], out)
    assert res.exit_code == 0, res.output
    scores = pq.read_table(out / "scores.parquet").to_pandas()
    assert list(scores["id"]) == [r["id"] for r in cal["rows"]]  # every row, in the dataset's order
    held = _held_out(cal, strategy)
    mine = scores.set_index("id").loc[held.index]
    for code in CODES:
        got = np.array([c[code] for c in mine["category_scores"]])
        want = np.array([c[code] for c in held["category_scores"]])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    np.testing.assert_allclose(mine["unsafe_score"], held["unsafe_score"], rtol=0, atol=1e-9)
    assert list(mine["flagged"]) == list(held["flagged"])
    # the raw scores are the run's predictions, the unexplored mass beside them
    pred = pd.concat(pd.read_parquet(f) for f in (cal["run"] / "predictions").glob("*.parquet"))
    pred = pred[pred["strategy"] == strategy].set_index("sample_id").loc[scores["id"]]
    for lab in ("unsafe", *CODES):
        want = np.array([(s or {}).get(lab) or 0.0 for s in pred["scores"]])
        np.testing.assert_allclose([r[lab] for r in scores["raw_scores"]], want, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(scores["unexplored_mass"].isna(), pred["unexplored_mass"].isna())


def test_the_jsonl_is_the_openai_moderation_shape(cal: dict) -> None:
    out = cal["d"] / "scores-cal-token_probability"
    if not out.exists():
        assert _score(cal["policies"]["token_probability"], cal["unlabeled"], out).exit_code == 0
    lines = (out / "scores.jsonl").read_text(encoding="utf-8").splitlines()
    table = pq.read_table(out / "scores.parquet").to_pylist()
    unsafe_t = read_policy(cal["policies"]["token_probability"]).verdicts[0].threshold
    assert len(lines) == len(table) == len(cal["rows"])
    for line, row in zip(lines, table):
        obj = json.loads(line)
        assert list(obj) == ["id", "flagged", "categories", "category_scores"]
        assert isinstance(obj["id"], str) and isinstance(obj["flagged"], bool)
        assert list(obj["categories"]) == CODES and all(isinstance(v, bool) for v in obj["categories"].values())
        assert list(obj["category_scores"]) == CODES
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in obj["category_scores"].values())
        assert obj == {k: row[k] for k in obj}
        assert obj["flagged"] == (any(obj["categories"].values()) or row["unsafe_score"] >= unsafe_t)


def test_evaluate_gives_back_the_held_out_numbers_the_policy_states(cal: dict) -> None:
    policy = cal["policies"]["token_probability"]
    out = cal["d"] / "evaluate"
    res = _score(policy, cal["dir"] / "data.jsonl", out, "--evaluate")
    assert res.exit_code == 0, res.output
    assert "held-out rows" in res.output
    ev = pd.read_csv(out / "evaluation.csv")
    assert set(ev["subset"]) == {"all", "held_out"}
    held = ev[ev["subset"] == "held_out"].set_index("label")
    p = read_policy(policy)
    for v in p.verdicts:
        for k, want in v.held_out.items():
            got = held.at[v.label, k]
            assert (np.isnan(want) and np.isnan(got)) or got == pytest.approx(want, abs=1e-9), (v.label, k)
    for k, want in p.flagged["held_out"].items():
        assert held.at["flagged", k] == pytest.approx(want, abs=1e-9, nan_ok=True)
    for name, rates in p.summary.items():
        for k, want in rates.items():
            assert held.at[name, k] == pytest.approx(want, abs=1e-9, nan_ok=True)
    every = ev[ev["subset"] == "all"].set_index("label")
    assert every.at["unsafe", "rows"] == len(cal["rows"])
    assert int(every.at["S1", "support"]) == sum("S1" in r["labels"] for r in cal["rows"])


def _refused(res, out: Path, msg: str) -> None:
    assert res.exit_code == 2, res.output
    assert msg in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not out.exists()


def test_another_model_prompt_taxonomy_or_parameters_are_refused(cal: dict, tiny_model_dir: Path) -> None:
    policy, d = cal["policies"]["token_probability"], cal["d"]
    out = d / "refused"
    _refused(_score(policy, cal["unlabeled"], out, "--models", str(tiny_model_dir)), out, "is not the model")
    msg = "loads in bfloat16, but"
    _refused(_score(policy, cal["unlabeled"], out, "--dtype", "bf16"), out, msg)  # fitted on float32 scores
    model = read_policy(policy).model["id"]
    cases = {
        "prompt": (f'models:\n  "{model}": {{answer_prefix: "Verdict: "}}\n', "reads another prompt"),
        "taxonomy": ("exclude_codes: [S14]\n", "not the policy's"),
        "other taxonomy": ("taxonomy: llama_guard_2\n", "taxonomy: 'llama_guard_2' is not the policy's"),
        "parameters": ("strategies:\n  token_probability: {max_new_tokens: 5, threshold: 0.3}\n", "max_new_tokens"),
        "semantics": ("semantics: paper\n", "semantics.yaml: semantics: 'paper' is not the policy's 'exact'"),
    }
    for name, (text, msg) in cases.items():
        params = d / f"{name}.yaml"
        params.write_text(text, encoding="utf-8")
        _refused(_score(policy, cal["unlabeled"], out, "--params", str(params)), out, msg)


def test_scorer_gives_the_records_score_writes(cal: dict) -> None:
    policy = cal["policies"]["token_probability"]
    out = cal["d"] / "scores-cal-token_probability"
    if not out.exists():
        assert _score(policy, cal["unlabeled"], out).exit_code == 0
    written = pq.read_table(out / "scores.parquet").to_pandas().set_index("id")
    scorer = Scorer.from_policy(policy)
    rows = [{k: v for k, v in r.items() if k != "labels"} for r in cal["rows"][:32]]  # the first partition
    recs = scorer.score(rows)
    assert [r.id for r in recs] == [r["id"] for r in rows]
    for rec in recs:
        w = written.loc[rec.id]
        assert rec.flagged == w["flagged"] and rec.categories == w["categories"]
        for c in CODES:
            assert rec.category_scores[c] == pytest.approx(w["category_scores"][c], abs=1e-9)
        assert rec.moderation() == {
            "id": rec.id,
            "flagged": rec.flagged,
            "categories": rec.categories,
            "category_scores": rec.category_scores,
        }
    plain = scorer.score(["How do I bake bread?", [{"role": "user", "content": "hi"}]])
    assert [r.id for r in plain] == ["0", "1"] and set(plain[0].category_scores) == set(CODES)
    with pytest.raises(ScorerError, match=r"conversations\[1\]"):
        scorer.score(["fine", {"no": "text"}])


def test_score_resumes_and_writes_the_same_rows(cal: dict) -> None:
    policy = cal["policies"]["token_probability"]
    out = cal["d"] / "resume"
    assert _score(policy, cal["unlabeled"], out).exit_code == 0
    first = (out / "scores.jsonl").read_text(encoding="utf-8")
    (out / "scores.jsonl").unlink()
    (out / "scores.parquet").unlink()
    res = runner.invoke(app, ["score", "--resume", str(out), "--no-ray", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "6 of 6 partitions done" in res.output
    assert (out / "scores.jsonl").read_text(encoding="utf-8") == first
    # the same --out with another policy is another job: refused in one line, the run kept
    other = cal["d"] / "other.yaml"
    res = runner.invoke(
        app,
        ["calibrate", str(cal["run"]), "--folds", "3", "--min-positives", "3", "--out", str(other)]
        + ["--strategies", "token_probability", "--objective", "recall>=0.9"],
    )
    assert res.exit_code == 0, res.output
    res = _score(other, cal["unlabeled"], out)
    assert res.exit_code == 2 and "policy_sha256" in res.output, res.output
    assert (out / "scores.jsonl").read_text(encoding="utf-8") == first


def test_rows_without_labels_parse_only_where_asked() -> None:
    tax = LLAMA_GUARD_3
    assert parse_line({"prompt": "hi"}, 1, tax, labeled=False).true_codes == ()
    assert parse_line({"unsafe_query": "x"}, 2, tax, labeled=False).conversation[0].content == "x"
    assert parse_line({"prompt": "hi", "labels": ["S1"]}, 3, tax, labeled=False).true_codes == ("S1",)
    with pytest.raises(ValueError, match="unrecognised record shape"):
        parse_line({"prompt": "hi"}, 1, tax)
    with pytest.raises(ValueError, match="unknown code"):
        parse_line({"prompt": "hi", "labels": ["S99"]}, 1, tax, labeled=False)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_unlabeled_csv_and_parquet_score_as_the_jsonl_does(cal: dict, fmt: str) -> None:
    cols = {"id": [], "prompt": [], "response": [], "conversation": []}
    for r in cal["rows"]:
        cols["id"].append(r["id"])
        cols["prompt"].append(r.get("prompt"))
        cols["response"].append(r.get("response"))
        cols["conversation"].append(json.dumps(r["conversation"]) if "conversation" in r else None)
    frame = pd.DataFrame(cols)
    data = cal["d"] / f"unlabeled.{fmt}"
    if fmt == "csv":
        frame.to_csv(data, index=False)
    else:
        frame.to_parquet(data, index=False)
    policy = cal["policies"]["token_probability"]
    jsonl_out = cal["d"] / "scores-cal-token_probability"
    if not jsonl_out.exists():
        assert _score(policy, cal["unlabeled"], jsonl_out).exit_code == 0
    out = cal["d"] / f"scores-{fmt}"
    res = _score(policy, data, out)
    assert res.exit_code == 0, res.output
    assert (out / "scores.jsonl").read_text(encoding="utf-8") == (jsonl_out / "scores.jsonl").read_text(
        encoding="utf-8"
    )
