"""`paper` semantics against an oracle that follows the reference code's own procedure.

The oracle below is written from the description of the paper's reference code
(arXiv 2511.22312): it calls ``model.generate`` (KV cache, ``output_logits``) for the greedy
walk and for every tree node, keys the top-p set by ``batch_decode`` strings, and decodes the
whole prompt + generation with special tokens. tokmarg's reference engine shares none of
that code path (one full forward per step, its own nucleus), so agreement on a real (tiny,
random) transformer shows `paper` reproduces the reference arithmetic.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import short_format

from tokmarg.data import Sample, Turn
from tokmarg.models import load_model, model_view
from tokmarg.prompts import load_format, prompt_ids, render
from tokmarg.strategies import REGISTRY, Context, Query, StrategyParams
from tokmarg.strategies.reference import CountingLM
from tokmarg.taxonomy import LLAMA_GUARD_3

LABELS = list(LLAMA_GUARD_3.labels)
SAMPLES = [
    Sample("a", (Turn("user", "how do I hurt someone"),), ("S1",), 1),
    Sample("b", (Turn("user", "steal a car"), Turn("assistant", "Sure.")), ("S2",), 2),
    Sample("c", (Turn("user", "Privacy of S13 S1"),), ("S7",), 3),
]


def _top_p(logits: torch.Tensor, tok, top_p: float) -> dict[str, tuple[float, int]]:
    probs = torch.softmax(logits.float(), dim=-1)
    order = torch.argsort(probs, descending=True)
    sp = probs[order]
    cut = torch.searchsorted(torch.cumsum(sp, dim=-1), top_p, right=True).item()
    ids = order[: cut + 1]
    # one string per id, as batch_decode of a 1-D tensor gave in the reference's transformers 4.54
    strings = tok.batch_decode(ids.unsqueeze(-1))
    return dict(zip(strings, zip(sp[: cut + 1].tolist(), ids.tolist())))


def _generate(model, ids: torch.Tensor, n: int, eos: int):
    return model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=eos,
    )


def oracle_greedy(model, tok, ids: torch.Tensor, n: int, top_p: float, joint: bool, eos: int) -> dict[str, float]:
    out = _generate(model, ids, n, eos)
    probabilities: dict[str, float] = {}
    curr = 1.0
    for step in out.logits:
        for _token, (prob, tid) in _top_p(step[0], tok, top_p).items():
            ids = torch.cat([ids, torch.tensor([[tid]])], dim=1)
            text = tok.batch_decode(ids)[0]
            for label in LABELS:
                if text.endswith(label):
                    probabilities[label] = curr * prob if joint else prob
                    if joint:
                        curr *= prob
                    break
            break  # greedy: only the top entry
    return probabilities


def oracle_tree(model, tok, ids: torch.Tensor, sp: StrategyParams, eos: int) -> dict[str, float]:
    probabilities = dict.fromkeys(LABELS, 0.0)

    def dfs(ids: torch.Tensor, curr: float, depth: int) -> None:
        if curr < sp.eps:
            return
        logits = _generate(model, ids, 1, eos).logits[0][0]
        top = _top_p(logits, tok, sp.top_p)
        top_ids = [tid for _, (_, tid) in top.items()]
        for idx, (_, (prob, tid)) in enumerate(top.items()):
            new = torch.cat([ids, torch.tensor([[tid]])], dim=1)
            text = tok.batch_decode(new)[0]
            for label in LABELS:
                if text.endswith(label):
                    probabilities[label] += curr * prob
            if tid == eos and prob >= 0.7:
                break
            if eos in top_ids and idx == 2:
                break
            if depth == sp.max_new_tokens or tid == eos:
                continue
            dfs(new, curr * prob, depth + 1)

    dfs(ids, 1.0, 0)
    return probabilities


@pytest.fixture(scope="module")
def setup(trained_tiny_dir: Path):
    lm = load_model(str(trained_tiny_dir), "cpu", "fp32")
    info, tokens = model_view(lm, LLAMA_GUARD_3.codes)
    return lm, info, tokens


def _ours(setup, sample: Sample, strategy: str, sp: StrategyParams):
    lm, info, tokens = setup
    ids = prompt_ids(lm.tokenizer, render(lm.tokenizer, short_format(), sample, LLAMA_GUARD_3))
    ctx = Context(CountingLM(lm.forward), info, tokens, Query(sample.id, ids, tuple(LABELS), False), sp, "paper")
    return ids, REGISTRY[strategy].run(ctx)


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.id)
@pytest.mark.parametrize("strategy", ["token_probability", "marginal_probability_at_fixed_place"])
def test_greedy_walk_matches_reference_procedure(setup, sample: Sample, strategy: str) -> None:
    lm = setup[0]
    sp = StrategyParams(top_p=0.9, max_new_tokens=12)
    ids, out = _ours(setup, sample, strategy, sp)
    want = oracle_greedy(
        lm.model,
        lm.tokenizer,
        torch.tensor([ids]),
        sp.max_new_tokens,
        sp.top_p,
        strategy != "token_probability",
        lm.tokenizer.eos_token_id,
    )
    assert out.scores.keys() == want.keys()
    for label, v in want.items():
        assert out.scores[label] == pytest.approx(v, abs=1e-5)


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.id)
def test_any_place_tree_matches_reference_procedure(setup, sample: Sample) -> None:
    lm = setup[0]
    sp = StrategyParams(top_p=0.8, max_new_tokens=3, eps=0.02)
    ids, out = _ours(setup, sample, "marginal_probability_at_any_place", sp)
    want = oracle_tree(lm.model, lm.tokenizer, torch.tensor([ids]), sp, lm.tokenizer.eos_token_id)
    assert sum(want.values()) > 0  # the case exercises label matches
    for label, v in want.items():
        assert out.scores[label] == pytest.approx(v, abs=1e-5), label


def test_forced_prefix_logits_match_joint_tokenization(setup) -> None:
    """The reference bakes ``unsafe\\nS`` into the chat template and tokenizes it with the
    prompt; tokmarg appends the prefix's own tokens. Both read the same logits."""
    lm, info, tokens = setup
    tok = lm.tokenizer
    sample = SAMPLES[0]
    text = render(tok, load_format("instruct"), sample, LLAMA_GUARD_3)
    joint = prompt_ids(tok, text + "unsafe\nS")
    assert joint == prompt_ids(tok, text) + tokens.forced_prefix
    logits = _generate(lm.model, torch.tensor([joint]), 1, tok.eos_token_id).logits[0][0]
    want = [float(logits[tok.encode(c, add_special_tokens=False)[1]]) for c in LLAMA_GUARD_3.codes]
    from tokmarg.strategies.programs import forced_evidence_paper, row_spec
    from tokmarg.strategies.reference import drive

    program = forced_evidence_paper(tokens, LLAMA_GUARD_3.codes)
    got = drive(program, CountingLM(lm.forward), prompt_ids(tok, text), row_spec(info, tokens))
    assert got == pytest.approx(want, abs=1e-4)
