"""Tier b: Meta's newer guards' classes on the fast engine, text path. A tiny random
``Llama4ForConditionalGeneration`` (Llama Guard 4: QK norm, layers without RoPE whose queries get a
position-dependent temperature, chunked attention) with the Llama 4 tokenizer, and a tiny
``MllamaForConditionalGeneration`` (Llama Guard 3 11B-Vision: cross-attention layers a text prompt
skips) with the Llama 3 tokenizer, each with its guard template: every strategy, both semantics,
the fast engine equal to full forwards."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import PROMPTS
from toy import assert_same, logtoku_tolerance
from typer.testing import CliRunner

from tokmarg.chat import ModelPrompt
from tokmarg.cli import app
from tokmarg.data import Sample, Turn
from tokmarg.engine.score import EngineOptions, score
from tokmarg.engine.tree import decoder_of, local_window
from tokmarg.models import load_model, model_view
from tokmarg.prompts import load_format
from tokmarg.strategies import REGISTRY, Query, StrategyParams
from tokmarg.taxonomy import BUILTIN

CASES = {
    "llama4": ("llama_guard_4_dir", "llama_guard_4_12b"),
    "mllama": ("llama_guard_3_vision_dir", "llama_guard_3_11b_vision"),
}


def _load(request: pytest.FixtureRequest, kind: str):
    fixture, tax = CASES[kind]
    lm = load_model(str(request.getfixturevalue(fixture)), "cpu", "fp32")
    return lm, BUILTIN[tax]


@pytest.mark.parametrize("semantics", ["exact", "paper"])
@pytest.mark.parametrize("kind", ["llama4", "mllama"])
def test_fast_matches_reference(request: pytest.FixtureRequest, kind: str, semantics: str) -> None:
    lm, tax = _load(request, kind)
    assert type(lm.model).__name__ == {"llama4": "Llama4ForCausalLM", "mllama": "MllamaForCausalLM"}[kind]
    assert decoder_of(lm.model) is lm.model.model  # get_decoder() returns the whole model for both
    info, tokens = model_view(lm, tax.codes)
    prompt = ModelPrompt(kind, lm.tokenizer, load_format("guard"), tax, "\n\n")
    samples = [Sample(str(i), (Turn("user", t),), (), i + 1) for i, t in enumerate(PROMPTS)]
    queries = [Query(s.id, prompt.ids(s), tax.labels, True) for s in samples]
    assert len({q.prompt_ids for q in queries}) == len(queries)
    sp = StrategyParams(top_p=0.9, max_new_tokens=4, eps=0.02)
    params = dict.fromkeys(REGISTRY, sp)
    ref, _ = score(lm, info, tokens, queries, list(REGISTRY), params, semantics, EngineOptions("reference"))
    # batches of 3; forwards of at most 5 tokens, so prompt suffixes and tree levels span several calls
    fast, stats = score(lm, info, tokens, queries, list(REGISTRY), params, semantics, EngineOptions("fast", 3, 5))
    assert stats.nodes > len(queries)  # trees were walked, not only greedy paths
    u_tol = [logtoku_tolerance(lm, info, tokens, q, semantics=semantics) for q in queries]
    for name in REGISTRY:
        for a, b, ut in zip(fast[name], ref[name], u_tol):
            assert_same(a, b, tol=1e-5, u_tol=ut if name == "LogTokU" else None)
    assert len({o.uncertainty for o in fast["LogTokU"]}) == len(queries)  # distinct prompts, distinct scores


def test_llama4_temperature_and_chunks(request: pytest.FixtureRequest) -> None:
    """The tiny Llama 4's temperature varies within a short prompt (floor scale 4), so a tree forward
    that kept the model's own assumption (positions 0, 1, ... of the forward) would differ: the probe
    in `prepare` is what caught it. Its chunked layers make prompts past 8,192 tokens a refusal."""
    lm, tax = _load(request, "llama4")
    cfg = lm.model.config
    assert cfg.floor_scale == 4 and not all(cfg.no_rope_layers)
    assert local_window(lm.model) == ("chunked", 8192)
    from tokmarg.engine import EngineError
    from tokmarg.engine.tree import TreeBackend

    info, tokens = model_view(lm, tax.codes)
    prompt = ModelPrompt("lg4", lm.tokenizer, load_format("guard"), tax, "\n\n")
    query = Query("a", prompt.ids(Sample("a", (Turn("user", "steal a car"),), (), 1)), tax.labels, True)
    cfg.attention_chunk_size = 16  # shorter than the prompt: the chunked layers would see less
    try:
        with pytest.raises(EngineError, match="uses chunked attention \\(window 16\\)"):
            score(lm, info, tokens, [query], ["LogTokU"], {"LogTokU": StrategyParams()}, "exact", EngineOptions())
    finally:
        cfg.attention_chunk_size = 8192
    # the tree forward puts each token at its own position: the model's own logits at the last one
    backend = TreeBackend(lm.model, lm.device, query.prompt_ids[:8], name="lg4")
    backend.begin([query.prompt_ids], None)
    try:
        got = backend.head(backend._hidden[[backend._rows[(0, ())]]])[0]
    finally:
        backend.end()
    want = lm.forward(query.prompt_ids)
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


@pytest.mark.parametrize(
    ("fixture", "taxonomy"),
    [
        ("llama_guard_4_dir", "llama_guard_4_12b"),
        ("llama_guard_3_vision_dir", "llama_guard_3_11b_vision"),
        ("llama_guard_3_1b_dir", "llama_guard_3_1b"),
    ],
)
def test_eval_on_metas_guards(request: pytest.FixtureRequest, fixture: str, taxonomy: str, tmp_path: Path) -> None:
    """`tokmarg eval` on the default (fast) engine completes on Llama Guard 4's, 3 11B-Vision's and
    3 1B's classes with their templates (text parts); each sample's own text reaches the model
    (its scores differ from the others'). Llama Guard 3 1B (13 codes) on a 14-code run, S14 excluded."""
    model_dir = request.getfixturevalue(fixture)
    run_taxonomy = "llama_guard_3\nexclude_codes: [S14]" if taxonomy == "llama_guard_3_1b" else taxonomy
    rows = [{"id": f"r{i}", "prompt": t, "labels": ["S1"] if i % 2 else []} for i, t in enumerate(PROMPTS)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    params = tmp_path / "p.yaml"
    params.write_text(
        f"taxonomy: {run_taxonomy}\nprompt: guard\n"
        "strategies:\n  token_probability: {max_new_tokens: 4}\n  marginal_probability_at_any_place: "
        "{max_new_tokens: 3, eps: 0.05, top_p: 0.9}\n  LogTokU: {}\n"
        f'models:\n  {model_dir}:\n    taxonomy: {taxonomy}\n    answer_prefix: "\\n\\n"\n',
        encoding="utf-8",
    )
    out = tmp_path / "run"
    args = ["eval", "--models", str(model_dir), "--dataset", str(data), "--params", str(params)]
    res = CliRunner().invoke(app, [*args, "--out", str(out), "--no-ray", "--no-progress"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["engine"] == "fast" and manifest["n_samples"] == len(rows)
    pred = pd.concat(pd.read_parquet(p) for p in (out / "predictions").glob("*.parquet"))
    forced = pred[pred.strategy == "LogTokU"]
    assert len({str(s) for s in forced.scores}) == len(rows)
