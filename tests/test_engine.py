"""The fast engine computes what the reference engine computes (tiers a and b)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from conftest import short_format
from toy import INFO, TOKENS, ToyLM, assert_same, ids, logtoku_tolerance

from tokmarg.data import Sample, Turn
from tokmarg.engine.scheduler import MemoBackend, run_batch
from tokmarg.engine.score import EngineOptions, score
from tokmarg.engine.tree import TreeBackend, common_prefix_len
from tokmarg.models import load_model, model_view
from tokmarg.prompts import load_format, prompt_ids, render
from tokmarg.strategies import REGISTRY, Context, Query, StrategyParams
from tokmarg.taxonomy import LLAMA_GUARD_3

TEXTS = ["how do I hurt someone", "steal a car please, right now", "Privacy of S13 S1", "x", "bake bread"]


def test_common_prefix_len() -> None:
    assert common_prefix_len([(1, 2, 3, 4), (1, 2, 5), (1, 2, 3)]) == 2
    assert common_prefix_len([(1, 2, 3), (1, 2, 3)]) == 2  # each prompt keeps one own token
    assert common_prefix_len([(7, 8)]) == 1
    assert common_prefix_len([(1,), (2,)]) == 0
    assert common_prefix_len([]) == 0


class PromptDispatch:
    """Several toy LMs, one per prompt: a batch of samples with different prompts."""

    def __init__(self, lms: list[ToyLM]):
        self.lms = lms

    def __call__(self, token_ids):
        for lm in self.lms:
            if tuple(token_ids[: len(lm.prompt)]) == lm.prompt:
                return lm(token_ids)
        raise KeyError(token_ids)


@pytest.mark.parametrize("semantics", ["exact", "paper"])
def test_toy_batch_of_samples_with_different_prompts(semantics: str) -> None:
    scripts = [
        {(): {"uns": 0.7, "safe": 0.3}, ("uns",): {"afe": 1.0}, ("uns", "afe"): {"\n": 0.9, "<eos>": 0.1}},
        {(): {"S": 0.6, "<eos>": 0.4}, ("S",): {"1": 1.0}, ("S", "1"): {"4": 0.6, ",": 0.3, "<eos>": 0.1}},
        {(): {"S2": 0.5, "S1": 0.5}},
    ]
    default = {"<eos>": 0.25, ",": 0.25, "S": 0.25, "1": 0.125, "2": 0.125}
    prompts = [("x", "\n"), ("x", "x", "\n"), ("x", "x", "x", "x", "\n")]
    lms = [ToyLM(s, prompt=p, default=default) for s, p in zip(scripts, prompts)]
    labels = ("unsafe", "S1", "S2", "S4", "S14")
    sp = StrategyParams(top_p=0.9, max_new_tokens=4, eps=0.05)
    ctxs = [
        [(name, Context(lm, INFO, TOKENS, Query(str(i), ids(p), labels, True), sp, semantics)) for name in REGISTRY]
        for i, (lm, p) in enumerate(zip(lms, prompts))
    ]
    fast = run_batch(MemoBackend(PromptDispatch(lms)), [[(n, replace(c, lm=None)) for n, c in row] for row in ctxs])
    for row, out_row in zip(ctxs, fast):
        for (name, c), out in zip(row, out_row):
            assert_same(out, REGISTRY[name].run(c))


@pytest.fixture(scope="module", params=["random", "trained"])
def model(request, tiny_model_dir: Path, trained_tiny_dir: Path):
    lm = load_model(str(tiny_model_dir if request.param == "random" else trained_tiny_dir), "cpu", "fp32")
    info, tokens = model_view(lm, LLAMA_GUARD_3.codes)
    return lm, info, tokens


def _queries(lm, fmt, gate: bool) -> list[Query]:
    samples = [Sample(str(i), (Turn("user", t),), (), i + 1) for i, t in enumerate(TEXTS)]
    return [
        Query(s.id, prompt_ids(lm.tokenizer, render(lm.tokenizer, fmt, s, LLAMA_GUARD_3)), LLAMA_GUARD_3.labels, gate)
        for s in samples
    ]


@pytest.mark.parametrize("semantics", ["exact", "paper"])
@pytest.mark.parametrize(("batch", "max_fwd", "fmt"), [(5, 4096, "short"), (2, 7, "short"), (3, 64, "instruct")])
def test_tree_backend_matches_reference(model, semantics: str, batch: int, max_fwd: int, fmt: str) -> None:
    """Every strategy, both semantics; batches mixing prompt lengths; forwards split into
    chunks so a prompt suffix and tree levels span several calls."""
    lm, info, tokens = model
    queries = _queries(lm, short_format() if fmt == "short" else load_format(fmt), gate=True)
    assert len({len(q.prompt_ids) for q in queries}) > 1
    sp = StrategyParams(top_p=0.9, max_new_tokens=4, eps=0.02)
    params = dict.fromkeys(REGISTRY, sp)
    ref, _ = score(lm, info, tokens, queries, list(REGISTRY), params, semantics, EngineOptions("reference"))
    fast, stats = score(
        lm, info, tokens, queries, list(REGISTRY), params, semantics, EngineOptions("fast", batch, max_fwd)
    )
    assert stats.prefix_tokens > 0
    for name in REGISTRY:
        for a, b in zip(fast[name], ref[name]):
            assert_same(a, b, tol=1e-5)
    for i in range(len(queries)):
        fast_tokens = sum(fast[s][i].tokens_forwarded for s in REGISTRY)
        ref_tokens = sum(ref[s][i].tokens_forwarded for s in REGISTRY)
        assert fast_tokens * 5 < ref_tokens


def test_each_node_forwarded_once(model) -> None:
    """The KV-cache backend forwards exactly the distinct nodes (plus each prompt's own
    tokens beyond the shared prefix) that a memo over full forwards computes."""
    lm, info, tokens = model
    queries = _queries(lm, short_format(), gate=True)
    sp = StrategyParams(top_p=0.9, max_new_tokens=3, eps=0.02)
    rows = [[(n, Context(None, info, tokens, q, sp, "exact")) for n in REGISTRY] for q in queries]
    p = common_prefix_len([q.prompt_ids for q in queries])
    tree = run_batch(TreeBackend(lm.model, lm.device, queries[0].prompt_ids[:p], 16, lookahead=0), rows)
    memo = run_batch(MemoBackend(lm.forward), rows)
    for q, t_row, m_row in zip(queries, tree, memo):
        t, m = sum(o.tokens_forwarded for o in t_row), sum(o.tokens_forwarded for o in m_row)
        assert t == m - p  # memo counts the whole prompt; the cache shares the prefix
        assert t < len(q.prompt_ids) - p + 200


def test_backend_reuse_across_batches_crops_cache(model) -> None:
    lm, info, tokens = model
    queries = _queries(lm, short_format(), gate=False)
    p = common_prefix_len([q.prompt_ids for q in queries])
    backend = TreeBackend(lm.model, lm.device, queries[0].prompt_ids[:p])
    sp = StrategyParams(top_p=0.9, max_new_tokens=3, eps=0.02)
    first = run_batch(backend, [[("token_probability", Context(None, info, tokens, queries[0], sp, "exact"))]])
    assert not backend.kv.own and len(backend.kv.prefix) == lm.model.config.num_hidden_layers  # the prefix stays
    assert all(k.shape[-2] == p for k, _ in backend.kv.prefix.values())
    again = run_batch(backend, [[("token_probability", Context(None, info, tokens, queries[0], sp, "exact"))]])
    assert_same(first[0][0], again[0][0])


@pytest.mark.parametrize("window", [80, 8])
def test_sliding_window_model_within_its_window(tiny_model_dir: Path, tmp_path: Path, window: int) -> None:
    """A Gemma-3-style model (sliding and full layers) on the fast engine, whose packed cache
    outgrows the window: while every sequence fits the window the outputs are the reference's;
    past it they would differ, and the fast engine refuses instead."""
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    from tokmarg.engine import EngineError

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=window,
        layer_types=["sliding_attention", "full_attention"] * 2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    gemma = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        gemma.model.embed_tokens.weight.mul_(8.0)  # tied head: sharper logits, so paths end
    gemma.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), "cpu", "fp32")
    info, tokens = model_view(lm, LLAMA_GUARD_3.codes)
    queries = _queries(lm, short_format(), gate=True)
    longest = max(len(q.prompt_ids) for q in queries)
    sp = StrategyParams(top_p=0.9, max_new_tokens=4, eps=0.02)
    params = dict.fromkeys(REGISTRY, sp)
    fast_opts = EngineOptions("fast", 5, 4096)
    if window == 8:
        assert longest > window
        with pytest.raises(EngineError, match="sliding-window"):
            score(lm, info, tokens, queries, list(REGISTRY), params, "exact", fast_opts)
        return
    assert window < len(queries) * longest  # the packed cache outgrows the window
    ref, _ = score(lm, info, tokens, queries, list(REGISTRY), params, "exact", EngineOptions("reference"))
    fast, _ = score(lm, info, tokens, queries, list(REGISTRY), params, "exact", fast_opts)
    u_tol = [logtoku_tolerance(lm, info, tokens, q) for q in queries]
    for name in REGISTRY:
        for a, b, ut in zip(fast[name], ref[name], u_tol):
            assert_same(a, b, tol=1e-5, u_tol=ut if name == "LogTokU" else None)


@pytest.mark.parametrize("semantics", ["exact", "paper"])
@pytest.mark.parametrize("which", ["guard_like", "trained"])
def test_llama3_vocabulary_fast_matches_reference(
    semantics: str, which: str, llama3_model_dir: Path, llama3_trained_dir: Path
) -> None:
    """The Llama 3 vocabulary (128,256 ids): a random model with guard-like nucleus sets, and one
    trained to answer `unsafe\\nS1,S14` (`S`,`1`,`,S`,`14`): every strategy within 1e-5."""
    lm = load_model(str(llama3_model_dir if which == "guard_like" else llama3_trained_dir), "cpu", "fp32")
    info, tokens = model_view(lm, LLAMA_GUARD_3.codes)
    from conftest import PROMPTS

    samples = [Sample(str(i), (Turn("user", t),), (), i + 1) for i, t in enumerate(PROMPTS)]
    queries = [
        Query(
            s.id,
            prompt_ids(lm.tokenizer, render(lm.tokenizer, short_format(), s, LLAMA_GUARD_3)),
            LLAMA_GUARD_3.labels,
            True,
        )
        for s in samples
    ]
    sp = StrategyParams(top_p=0.99, max_new_tokens=8, eps=0.01)
    params = dict.fromkeys(REGISTRY, sp)
    ref, _ = score(lm, info, tokens, queries, list(REGISTRY), params, semantics, EngineOptions("reference"))
    fast, stats = score(lm, info, tokens, queries, list(REGISTRY), params, semantics, EngineOptions("fast", 4, 64))
    for name in REGISTRY:
        for a, b in zip(fast[name], ref[name]):
            assert_same(a, b, tol=1e-5)
    if which == "guard_like":  # summaries, not 513 KB rows (a trained tiny model's nuclei are wide)
        assert stats.bytes_to_host / stats.nodes < 16_000
    if which == "trained":  # the case is exercised: the tree reaches S14 after S1 through `,S`
        p = common_prefix_len([q.prompt_ids for q in queries])
        backend = TreeBackend(lm.model, lm.device, queries[0].prompt_ids[:p], 64)
        backend.record = {}
        run_batch(
            backend, [[("marginal_probability_at_any_place", Context(None, info, tokens, queries[0], sp, semantics))]]
        )
        fourteen = lm.tokenizer.convert_tokens_to_ids("14")
        through = [
            st
            for (_, path), st in backend.record.items()
            if lm.tokenizer.decode(path).endswith("S1,S") and lm.tokenizer.decode(path[-1:]) == ",S"
        ]
        assert through and any(fourteen in st.top_ids.tolist() for st in through)
        tree = fast["marginal_probability_at_any_place"][0]
        assert tree.scores["S1"] > 0.05 and tree.scores["S14"] > 0.05, tree.scores


def test_attention_matmul_path_equals_fused_kernel() -> None:
    """The matmul path (what runs where torch's fused CPU kernel does not) gives the same output
    and log-sum-exp: grouped-query heads, an additive mask with padding rows."""
    import torch

    from tokmarg.engine.attention import _attend_matmul, attend

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 8, 5, 16), torch.randn(3, 2, 11, 16), torch.randn(3, 2, 11, 16)
    allowed = torch.rand(3, 1, 5, 11) > 0.4
    allowed[..., 0] = True
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    for m in (mask, None):
        out, lse = attend(q, k, v, m, 0.25)
        out2, lse2 = _attend_matmul(q, k, v, m, 0.25)
        assert (out - out2).abs().max() < 1e-5 and (lse - lse2).abs().max() < 1e-5


def test_tree_backend_on_the_matmul_attention_path(model, monkeypatch) -> None:
    import tokmarg.engine.attention as attention

    monkeypatch.setattr(attention, "attend", attention._attend_matmul)
    lm, info, tokens = model
    queries = _queries(lm, short_format(), gate=True)
    params = dict.fromkeys(REGISTRY, StrategyParams(top_p=0.9, max_new_tokens=4, eps=0.02))
    ref, _ = score(lm, info, tokens, queries, list(REGISTRY), params, "exact", EngineOptions("reference"))
    fast, _ = score(lm, info, tokens, queries, list(REGISTRY), params, "exact", EngineOptions("fast", 3, 7))
    for name in REGISTRY:
        for a, b in zip(fast[name], ref[name]):
            assert_same(a, b, tol=1e-5)


def test_fast_engine_refuses_what_it_cannot_reproduce(tiny_model_dir: Path, monkeypatch) -> None:
    """One line, before any work: a model whose attention bypasses transformers' interface, and
    one whose logits the fast path would not reproduce (found by the probe at the switch)."""
    from transformers import LlamaForCausalLM

    from tokmarg.engine import EngineError
    from tokmarg.engine.tree import prepare

    lm = load_model(str(tiny_model_dir), "cpu", "fp32")
    monkeypatch.setattr(LlamaForCausalLM, "_can_set_attn_implementation", lambda self: False)
    with pytest.raises(EngineError, match="does not use transformers' attention interface.*--engine reference"):
        prepare(lm.model, "tiny")
    monkeypatch.undo()
    lm.model.config.final_logit_softcapping = 0.5  # applied by the fast path's head, not by Llama's forward
    with pytest.raises(EngineError, match=r"logits differ from the model's own .* on a probe.*--engine reference"):
        prepare(lm.model, "tiny")
    assert lm.model.config._attn_implementation == "sdpa"  # left as it was
