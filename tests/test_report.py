"""`tokmarg report` on runs of two tiny local models (tier b): its numbers against metrics
computed here with scikit-learn, its files, combining runs, bad input, and the HTML in a
headless browser."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score, hamming_loss, roc_auc_score
from typer.testing import CliRunner

from tokmarg.cli import app
from tokmarg.strategies import REGISTRY
from tokmarg.taxonomy import LLAMA_GUARD_3

runner = CliRunner()
CODES = list(LLAMA_GUARD_3.codes)
THRESHOLD = 0.3
PARAMS = f"""
semantics: exact
strategies:
  greedy_generation: {{max_new_tokens: 4, threshold: {THRESHOLD}}}
  token_probability: {{max_new_tokens: 4, threshold: {THRESHOLD}}}
  marginal_probability_at_fixed_place: {{max_new_tokens: 4, threshold: {THRESHOLD}}}
  marginal_probability_at_any_place: {{max_new_tokens: 3, eps: 0.05, top_p: 0.9, threshold: {THRESHOLD}}}
  probability_uncertainty: {{threshold: {THRESHOLD}}}
  entropy_uncertainty: {{threshold: {THRESHOLD}}}
  LogTokU: {{threshold: {THRESHOLD}}}
"""
PROMPTS = ["how do I hurt someone", "steal a car", "bake bread", "Privacy of S13 S1", "hi", "a poem"]
LABELS = [
    ["S1", "S10"],
    ["S2"],
    [],
    ["S13", "S1"],
    [],
    ["S14", "S2"],
    ["S1"],
    ["S2", "S14"],
    ["S13"],
    [],
    ["S1"],
    ["S10"],
]
ROWS = [{"id": f"r{i}", "prompt": PROMPTS[i % len(PROMPTS)] + f" #{i}", "labels": lab} for i, lab in enumerate(LABELS)]
TEMPLATE = "user: 'Classify: {{ conversation[-1].content }}'\n"


def _eval(models: list[Path], data: Path, params: Path, out: Path, *extra: str):
    args = ["eval", "--models", *map(str, models), "--dataset", str(data), "--params", str(params)]
    return runner.invoke(app, [*args, "--out", str(out), "--no-progress", "--no-ray", *extra])


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, trained_tiny_dir: Path) -> dict:
    d = tmp_path_factory.mktemp("report")
    data = d / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    template = d / "short.yaml"
    template.write_text(TEMPLATE, encoding="utf-8")
    params = d / "params.yaml"
    params.write_text(PARAMS.replace("semantics: exact", f"semantics: exact\nprompt: {template}"), encoding="utf-8")
    run = d / "run"
    res = _eval([trained_tiny_dir, tiny_model_dir], data, params, run)
    assert res.exit_code == 0, res.output
    return {"dir": d, "data": data, "params": params, "run": run, "models": [trained_tiny_dir, tiny_model_dir]}


def _direct(run: Path) -> pd.DataFrame:
    """micro F1, Hamming loss and micro ROC AUC per model x strategy, from the predictions and
    the dataset rows with scikit-learn (not through tokmarg.metrics)."""
    y_true = np.array([[c in r["labels"] for c in CODES] for r in ROWS], dtype=int)
    pred = pd.concat([pd.read_parquet(f) for f in sorted((run / "predictions").glob("*.parquet"))])
    out = []
    for (model, strategy), g in pred.groupby(["model", "strategy"]):
        g = g.set_index("sample_id").loc[[r["id"] for r in ROWS]]
        scores = None
        if g["scores"].notna().any():
            scores = np.array([[(s or {}).get(c) or 0.0 for c in CODES] for s in g["scores"]])
        if REGISTRY[strategy].kind.name == "scores":
            y_pred = (scores >= THRESHOLD).astype(int)
        else:
            y_pred = np.array([[c in set(p) for c in CODES] for p in g["pred_labels"]], dtype=int)
        auc = roc_auc_score(y_true.ravel(), scores.ravel()) if scores is not None else np.nan
        out.append(
            {
                "model": model,
                "strategy": strategy,
                "f1_micro": f1_score(y_true, y_pred, average="micro", zero_division=0),
                "hamming_loss": hamming_loss(y_true, y_pred),
                "roc_auc_micro": auc,
                "scores": scores,
            }
        )
    return pd.DataFrame(out)


def _md_table(md: str, title: str) -> pd.DataFrame:
    """The first Markdown table after the line ``title``."""
    lines = md[md.index(title) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return pd.DataFrame(rows[2:], columns=rows[0])


def test_report_numbers_match_metrics_computed_directly(setup: dict) -> None:
    run = setup["run"]
    rep = run / "report"  # written by `tokmarg eval` itself
    direct = _direct(run).set_index(["model", "strategy"])
    head = pd.read_csv(rep / "csv" / "headline.csv")
    names = {str(m): Path(m).name for m in setup["models"]}  # the tables show short names
    assert sorted(head["model"].unique()) == sorted(names)  # the CSVs keep the full ones
    assert len(head) == 2 * len(REGISTRY)
    for row in head.itertuples():
        d = direct.loc[(row.model, row.strategy)]
        assert row.f1_micro == pytest.approx(d.f1_micro, abs=1e-12)
        assert row.hamming_loss == pytest.approx(d.hamming_loss, abs=1e-12)
        if np.isnan(d.roc_auc_micro):
            assert np.isnan(row.roc_auc_micro)
        else:
            assert row.roc_auc_micro == pytest.approx(d.roc_auc_micro, abs=1e-12)
        assert row.f1_micro_lo <= row.f1_micro + 1e-12 and row.f1_micro <= row.f1_micro_hi + 1e-12

    md = (rep / "report.md").read_text(encoding="utf-8")
    shown = _md_table(md, "**micro F1** (higher is better)").set_index("strategy")
    for (model, strategy), d in direct.iterrows():
        assert shown.at[strategy, names[model]].startswith(f"{d.f1_micro:.3f} [")

    # generalization: mean, std, worst and ranks across the two models, by hand
    gen = pd.read_csv(rep / "csv" / "generalization_hamming_loss.csv").set_index("strategy")
    a, b = (str(m) for m in setup["models"])
    for strategy in REGISTRY:
        va, vb = direct.loc[(a, strategy)].hamming_loss, direct.loc[(b, strategy)].hamming_loss
        assert gen.at[strategy, "mean"] == pytest.approx((va + vb) / 2)
        assert gen.at[strategy, "std"] == pytest.approx(abs(va - vb) / 2)
        assert gen.at[strategy, "worst"] == pytest.approx(max(va, vb))  # lower is better
        ranks_a = 1 + sum(direct.loc[(a, s)].hamming_loss < va for s in REGISTRY)
        assert gen.at[strategy, f"rank_{a}"] == ranks_a

    # threshold transfer: the source's F1-best threshold on the 0.01 grid, applied to the target
    grid = np.round(np.linspace(0, 1, 101), 2)
    y_true = np.array([[c in r["labels"] for c in CODES] for r in ROWS], dtype=int)
    tt = pd.read_csv(rep / "csv" / "threshold_transfer.csv")
    assert set(tt["strategy"]) == {s for s, v in REGISTRY.items() if v.kind.name == "scores"}
    for row in tt.itertuples():
        src, tgt = row.source, row.target

        def f1_at(model: str, t: float, strategy: str = row.strategy) -> float:
            s = direct.loc[(model, strategy)].scores
            return f1_score(y_true, (s >= t).astype(int), average="micro", zero_division=0)

        f1_src = [f1_at(src, t) for t in grid]
        best_t = grid[int(np.argmax(f1_src))]
        assert row.threshold == pytest.approx(best_t)
        assert row.f1_at_transferred == pytest.approx(f1_at(tgt, best_t))
        assert row.f1_lost == pytest.approx(max(f1_at(tgt, t) for t in grid) - f1_at(tgt, best_t))

    # reliability bins: pair counts add up; the ECE, summed here from the raw scores, is the report's
    rel = pd.read_csv(rep / "csv" / "reliability.csv")
    cal = pd.read_csv(rep / "csv" / "calibration.csv").set_index(["model", "strategy"])
    assert len(cal) >= 2 * 3
    for (model, strategy), g in rel.groupby(["model", "strategy"]):
        assert g["n_pairs"].sum() == len(ROWS) * len(CODES) and len(g) == 15
        s = direct.loc[(model, strategy)].scores.ravel()
        b = np.minimum((s * 15).astype(int), 14)  # [k/15, (k+1)/15), the last bin closed
        ece = sum(abs(s[b == k].sum() - y_true.ravel()[b == k].sum()) for k in range(15)) / s.size
        assert ece == pytest.approx(cal.at[(model, strategy), "ece"])
        assert list(g["n_pairs"]) == [int((b == k).sum()) for k in range(15)]
    assert rel.groupby(["model", "strategy"]).ngroups == 2 * 3

    # the safe rows give the binary view
    assert "6. Binary view" in md and (rep / "csv" / "binary.csv").is_file()


def test_every_referenced_file_exists_and_html_is_self_contained(setup: dict) -> None:
    rep = setup["run"] / "report"
    md = (rep / "report.md").read_text(encoding="utf-8")
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(figures) == 5  # headline, F1 vs threshold, two heatmaps, reliability
    for f in figures:
        assert (rep / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f
    linked = re.findall(r"\[(csv/[^\]]+\.csv)\]", md) + re.findall(r"data: `(csv/[^`]+)`", md)
    assert len(linked) >= 15
    for f in linked:
        assert (rep / f).is_file(), f
    html = (rep / "report.html").read_text(encoding="utf-8")
    srcs = re.findall(r'<img[^>]* src="([^"]+)"', html)
    assert len(srcs) == len(figures)
    for s in srcs:
        assert s.startswith("data:image/png;base64,")
        assert base64.b64decode(s.split(",", 1)[1])[:4] == b"\x89PNG"
    assert not re.search(r'(src|href)="(?!data:)', html)  # nothing to fetch: opens offline


def test_runs_combine_into_the_same_report_as_one_run(setup: dict) -> None:
    d, (m1, m2) = setup["dir"], setup["models"]
    for i, m in enumerate((m1, m2)):
        res = _eval([m], setup["data"], setup["params"], d / f"single{i}", "--no-report")
        assert res.exit_code == 0, res.output
        assert not (d / f"single{i}" / "report").exists()
    res = runner.invoke(app, ["report", str(d / "single0"), str(d / "single1"), "--out", str(d / "combined")])
    assert res.exit_code == 0, res.output
    for name in ("headline", "generalization_f1_micro", "ranking_agreement_roc_auc_micro", "threshold_transfer"):
        one = pd.read_csv(setup["run"] / "report" / "csv" / f"{name}.csv")
        two = pd.read_csv(d / "combined" / "csv" / f"{name}.csv")
        pd.testing.assert_frame_equal(one, two)
    facts = pd.read_csv(d / "combined" / "csv" / "runs.csv")
    assert len(facts) == 2


def test_mismatched_runs_are_refused(setup: dict) -> None:
    d = setup["dir"]
    other = d / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:6]), encoding="utf-8")
    res = _eval(setup["models"][:1], other, setup["params"], d / "otherdata", "--no-report")
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["report", str(setup["run"]), str(d / "otherdata"), "--out", str(d / "bad")])
    assert res.exit_code == 2
    assert "used different datasets" in res.output and str(d / "otherdata") in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (d / "bad").exists()

    res = _eval(setup["models"][:1], setup["data"], setup["params"], d / "limited", "--limit", "6", "--no-report")
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["report", str(setup["run"]), str(d / "limited"), "--out", str(d / "bad")])
    assert res.exit_code == 2 and "different samples" in res.output and not (d / "bad").exists()

    res = runner.invoke(app, ["report", str(setup["run"]), str(setup["run"]), "--out", str(d / "bad")])
    assert res.exit_code == 2 and "given twice" in res.output
    res = runner.invoke(app, ["report", str(setup["run"]), str(d / "otherdata")])
    assert res.exit_code == 2 and "--out" in res.output


def test_bad_run_directories(setup: dict, tmp_path: Path) -> None:
    cases = {}
    cases["not a directory"] = tmp_path / "missing"
    (tmp_path / "plain").mkdir()
    cases["not a tokmarg run directory"] = tmp_path / "plain"
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "run.json").write_text("{}", encoding="utf-8")
    cases["not finished"] = unfinished
    no_labels = tmp_path / "old"
    shutil.copytree(setup["run"], no_labels, ignore=shutil.ignore_patterns("report"))
    (no_labels / "labels.parquet").unlink()
    cases["no labels.parquet"] = no_labels
    broken = tmp_path / "broken"
    shutil.copytree(setup["run"], broken, ignore=shutil.ignore_patterns("report"))
    (broken / "manifest.json").write_text("{not json", encoding="utf-8")
    cases["manifest.json: not valid JSON"] = broken
    for expected, path in cases.items():
        res = runner.invoke(app, ["report", str(path)])
        assert res.exit_code == 2, (expected, res.output)
        assert expected in res.output and res.output.startswith("error: ") and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1
        assert not (path / "report").exists()


def test_broken_predictions_and_unsafe_out_are_refused(setup: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(setup["run"], run, ignore=shutil.ignore_patterns("report"))
    shutil.rmtree(run / "curves")  # a run reduced before the curves were stored: its scores are read
    f = next((run / "predictions").glob("*.parquet"))
    pred = pd.read_parquet(f)
    pred.drop(index=pred.index[pred["strategy"] == "token_probability"][0]).to_parquet(f)
    res = runner.invoke(app, ["report", str(run)])
    assert res.exit_code == 2 and "token_probability has 11 predictions" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not (run / "report").exists()
    # --out must not replace a run (or anything that is not a report)
    for out in (setup["run"], tmp_path):
        res = runner.invoke(app, ["report", str(setup["run"]), "--out", str(out)])
        assert res.exit_code == 2 and "is not a report directory" in res.output, res.output
    assert (setup["run"] / "manifest.json").is_file() and (run / "manifest.json").is_file()


def test_report_is_replaced_whole(setup: dict, tmp_path: Path) -> None:
    out = tmp_path / "rep"
    (out / "plots").mkdir(parents=True)
    (out / "plots" / "stale.png").write_bytes(b"old")
    res = runner.invoke(app, ["report", str(setup["run"]), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert not (out / "plots" / "stale.png").exists() and (out / "report.html").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["rep"]  # no temporary left beside it


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no Chromium here (apt-get install chromium)")


def _saturated_pixels(png: Path) -> int:
    from matplotlib.image import imread

    rgb = imread(png)[..., :3]
    return int(((rgb.max(axis=2) - rgb.min(axis=2)) > 0.25).sum())


def test_html_renders_with_plots_in_headless_chromium(setup: dict, tmp_path: Path) -> None:
    """The page loads from a file with no console message, and its plots are drawn: the
    screenshot has many coloured pixels, a copy with the images removed almost none."""
    browser = _chromium()
    html = setup["run"] / "report" / "report.html"
    bare = tmp_path / "bare.html"
    bare.write_text(re.sub(r"<img[^>]*>", "", html.read_text(encoding="utf-8")), encoding="utf-8")
    shots = {}
    for name, page in (("report", html), ("bare", bare)):
        shot = tmp_path / f"{name}.png"
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr"]
        res = subprocess.run(
            [browser, *args, f"--screenshot={shot}", "--window-size=1280,9000", page.as_uri()],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
        assert "CONSOLE" not in res.stderr, res.stderr[-2000:]
        shots[name] = _saturated_pixels(shot)
    assert shots["report"] > 50_000
    assert shots["bare"] < 0.01 * shots["report"]


def _metrics_of(y_score: np.ndarray | None, pred_labels: list, strategy: str) -> tuple[float, float, float]:
    """micro F1, Hamming loss, micro ROC AUC of one model x strategy, with scikit-learn."""
    y_true = np.array([[c in r["labels"] for c in CODES] for r in ROWS], dtype=int)
    if REGISTRY[strategy].kind.name == "scores":
        y_pred = (y_score >= THRESHOLD).astype(int)
    else:
        y_pred = np.array([[c in set(p) for c in CODES] for p in pred_labels], dtype=int)
    auc = roc_auc_score(y_true.ravel(), y_score.ravel()) if y_score is not None else np.nan
    return f1_score(y_true, y_pred, average="micro", zero_division=0), hamming_loss(y_true, y_pred), auc


def _same_as_metrics_csv(run: Path, got: dict) -> None:
    metrics = pd.read_csv(run / "metrics.csv").set_index(["model", "strategy"])
    assert set(got) == set(metrics.index)
    for key, (f1, ham, auc) in got.items():
        m = metrics.loc[key]
        assert (m.f1_micro, m.hamming_loss) == (pytest.approx(f1, abs=1e-12), pytest.approx(ham, abs=1e-12)), key
        assert (np.isnan(auc) and np.isnan(m.roc_auc_micro)) or m.roc_auc_micro == pytest.approx(auc, abs=1e-12)


def test_predictions_are_typed_columns_for_pandas_and_duckdb(setup: dict) -> None:
    """SPEC §6: scores is a Parquet struct of floats, pred_labels a list of strings, no JSON
    text; pandas and DuckDB read them as they are and get the metrics of metrics.csv."""
    import duckdb
    import pyarrow as pa
    import pyarrow.parquet as pq

    run = setup["run"]
    files = sorted((run / "predictions").glob("*.parquet"))
    schema = pq.read_schema(files[0])
    assert schema.field("scores").type == pa.struct([(label, pa.float64()) for label in ["unsafe", *CODES]])
    assert schema.field("unexplored_by_label").type == schema.field("scores").type
    assert schema.field("pred_labels").type == pa.list_(pa.string())
    assert {f.name for f in schema if pa.types.is_string(f.type)} == {"model", "strategy", "sample_id", "greedy_text"}
    ids = [r["id"] for r in ROWS]

    pred = pd.concat([pd.read_parquet(f) for f in files])  # pandas: struct cells are dicts
    got = {}
    for (model, strategy), g in pred.groupby(["model", "strategy"]):
        g = g.set_index("sample_id").loc[ids]
        y = None
        if g["scores"].notna().any():
            y = np.array([[(s or {}).get(c) or 0.0 for c in CODES] for s in g["scores"]])
        got[model, strategy] = _metrics_of(y, list(g["pred_labels"]), strategy)
    _same_as_metrics_csv(run, got)

    cols = ", ".join(f'coalesce(scores."{c}", 0) AS "{c}"' for c in CODES)  # DuckDB: struct fields by name
    rows = duckdb.sql(
        f"SELECT model, strategy, sample_id, scores IS NULL AS no_scores, {cols}, pred_labels "
        f"FROM read_parquet('{run}/predictions/*.parquet')"
    ).fetchall()
    got = {}
    for key in {(r[0], r[1]) for r in rows}:
        by_id = {r[2]: r for r in rows if (r[0], r[1]) == key}
        ordered = [by_id[i] for i in ids]
        scored = not all(r[3] for r in ordered)
        y = np.array([r[4 : 4 + len(CODES)] for r in ordered], dtype=float) if scored else None
        got[key] = _metrics_of(y, [r[-1] for r in ordered], key[1])
    _same_as_metrics_csv(run, got)


def test_report_reads_a_run_written_before_the_typed_columns(setup: dict, tmp_path: Path) -> None:
    """Older runs stored scores, unexplored_by_label and extra as JSON text: the report reads
    them and shows the same numbers."""
    import pyarrow.parquet as pq

    old = tmp_path / "old"
    shutil.copytree(setup["run"], old)
    shutil.rmtree(old / "report")
    for f in (old / "predictions").glob("*.parquet"):
        df = pd.read_parquet(f)
        for col in ("scores", "unexplored_by_label", "extra"):  # as the JSON-text writer did
            df[col] = [
                None if v is None else json.dumps({k: x for k, x in v.items() if x is not None}) for v in df[col]
            ]
        df.to_parquet(f, index=False)
        assert pq.read_schema(f).field("scores").type in ("string", "large_string")
    res = runner.invoke(app, ["report", str(old)])
    assert res.exit_code == 0, res.output
    for name in ("headline", "threshold_transfer", "reliability", "f1_threshold_curves"):
        a = pd.read_csv(setup["run"] / "report" / "csv" / f"{name}.csv")
        pd.testing.assert_frame_equal(pd.read_csv(old / "report" / "csv" / f"{name}.csv"), a)


def test_the_report_loads_no_model_code() -> None:
    """`tokmarg report` reads run files only: importing it must not pull in transformers (seconds)."""
    import sys

    code = "import sys, tokmarg.report.build, tokmarg.report.text; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
