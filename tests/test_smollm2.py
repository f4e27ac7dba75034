"""Tier (c): the embedded SmolLM2-135M-Instruct (real GGUF weights, CPU). Marked slow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tokmarg.cli import app
from tokmarg.config import build_config
from tokmarg.data import load_dataset
from tokmarg.models import load_model, model_view
from tokmarg.prompts import load_format, prompt_ids, render
from tokmarg.strategies import REGISTRY, Context, Query, StrategyParams
from tokmarg.strategies.reference import CountingLM
from tokmarg.taxonomy import LLAMA_GUARD_3

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smol():
    lm = load_model("smollm2-135m-instruct", "cpu", "fp32")
    info, tokens = model_view(lm, LLAMA_GUARD_3.codes)
    return lm, info, tokens


def test_digit_split_tokens(smol) -> None:
    lm, info, tokens = smol
    tok = lm.tokenizer
    as_text = lambda ids: [tok.decode([i]) for i in ids]  # noqa: E731
    assert as_text(tokens.forced_prefix) == ["uns", "afe", "\n", "S"]
    assert as_text(tokens.code_rest["S14"]) == ["1", "4"]
    assert as_text(tokens.code_rest["S1"]) == ["1"]
    # the paper reads encode(code)[1]: S1 and S10..S14 all map to the id of "1"
    assert {tokens.code_paper_id[c] for c in ("S1", "S10", "S11", "S12", "S13", "S14")} == {tokens.code_paper_id["S1"]}
    assert len(tokens.verdict_ids["unsafe"]) == 2 and len(tokens.verdict_ids["safe"]) == 1
    assert info.eos_ids == frozenset({2})
    digit = tok.convert_tokens_to_ids("4")
    assert not bool(info.boundary[digit]) and bool(info.boundary[tok.convert_tokens_to_ids(",")])


def test_exact_any_place_bounds_on_real_output(smol) -> None:
    lm, info, tokens = smol
    ds = load_dataset(REPO / "datasets" / "sample.jsonl", LLAMA_GUARD_3, limit=2)
    fmt = load_format("instruct")
    lmc = CountingLM(lm.forward)
    for sample in ds.samples:
        ids = prompt_ids(lm.tokenizer, render(lm.tokenizer, fmt, sample, LLAMA_GUARD_3))
        assert ids[0] == lm.tokenizer.convert_tokens_to_ids("<|im_start|>") and ids[1] != ids[0]  # no extra BOS
        q = Query(sample.id, ids, LLAMA_GUARD_3.labels, True)
        ctx = Context(lmc, info, tokens, q, StrategyParams(top_p=0.9, max_new_tokens=4, eps=0.02), "exact")
        out = REGISTRY["marginal_probability_at_any_place"].run(ctx)
        assert out.scores is not None and out.unexplored_by_label is not None
        assert 0.0 <= out.unexplored_mass <= 1.0 + 1e-9
        for label, s in out.scores.items():
            assert 0.0 <= s <= 1.0
            assert s + out.unexplored_by_label[label] <= 1.0 + 1e-6
            assert out.unexplored_by_label[label] <= out.unexplored_mass + 1e-9
        lmc.reset()


def test_eval_cli_on_smollm2(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(
        "strategies:\n" + "".join(f"  {s}: {{max_new_tokens: 3, top_p: 0.9, eps: 0.05}}\n" for s in REGISTRY),
        encoding="utf-8",
    )
    build_config(params)  # valid
    out = tmp_path / "run"
    res = CliRunner().invoke(
        app,
        [
            "eval",
            "--dataset",
            str(REPO / "datasets" / "sample.jsonl"),
            "--params",
            str(params),
            "--limit",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["models"] == ["smollm2-135m-instruct"] and manifest["n_samples"] == 2
    for name in REGISTRY:
        assert name in res.output


@pytest.mark.parametrize("semantics", ["exact", "paper"])
def test_fast_engine_matches_reference_on_smollm2(smol, semantics: str) -> None:
    from toy import assert_same

    from tokmarg.engine.score import EngineOptions, score

    lm, info, tokens = smol
    ds = load_dataset(REPO / "datasets" / "sample.jsonl", LLAMA_GUARD_3, limit=3)
    fmt = load_format("instruct")
    queries = [
        Query(s.id, prompt_ids(lm.tokenizer, render(lm.tokenizer, fmt, s, LLAMA_GUARD_3)), LLAMA_GUARD_3.labels, True)
        for s in ds.samples
    ]
    params = dict.fromkeys(REGISTRY, StrategyParams(top_p=0.9, max_new_tokens=5, eps=0.02))
    ref, _ = score(lm, info, tokens, queries, list(REGISTRY), params, semantics, EngineOptions("reference"))
    fast, _ = score(lm, info, tokens, queries, list(REGISTRY), params, semantics, EngineOptions("fast", 2))
    for name in REGISTRY:
        for a, b in zip(fast[name], ref[name]):
            assert_same(a, b, tol=1e-5)
