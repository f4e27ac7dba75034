"""Guessing greedy paths ahead (prompt lookup): the guesses, their adaptation, and that they change
no output, only the number of sequential model calls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from toy import assert_same

from tokmarg.data import Sample, Turn
from tokmarg.engine.lookahead import Lookahead, lookup
from tokmarg.engine.score import EngineOptions, score
from tokmarg.models import load_model, model_view
from tokmarg.prompts import load_format, prompt_ids, render
from tokmarg.strategies import REGISTRY, Query, StrategyParams
from tokmarg.taxonomy import LLAMA_GUARD_3

REPO = Path(__file__).resolve().parents[1]


def test_lookup_continues_the_latest_earlier_ngram() -> None:
    ctx = np.array([5, 1, 2, 3, 7, 8, 9, 1, 2, 3, 4, 6, 1, 2, 3])
    assert lookup(ctx, 2) == [4, 6]  # (1, 2, 3) last seen before the end at index 7
    assert lookup(ctx, 10) == [4, 6, 1, 2, 3]  # as far as the context goes
    assert lookup(np.array([9, 4, 5, 0, 4, 5]), 3) == [0, 4, 5]  # no 3-gram match: the 2-gram (4, 5)
    assert lookup(np.array([1, 2, 3, 4]), 3) == []  # nothing repeats
    assert lookup(ctx, 0) == []


def test_lookahead_guesses_whole_after_a_hit_one_token_after_a_miss() -> None:
    la = Lookahead(max_tokens=6, first=3)
    ctx = np.array([*range(1, 31), 1, 2])  # (1, 2) was followed by 3, 4, 5, ...
    chain = la.guess((0, (1, 2)), ctx)
    assert chain == [(0, (1, 2, 3)), (0, (1, 2, 3, 4)), (0, (1, 2, 3, 4, 5))]
    la.asked((0, (1, 2, 3)))  # the path took the first guessed token, then wanted another
    assert len(la.guess((0, (1, 2, 3, 9)), ctx)) == 6  # after a hit: the whole max
    assert len(la.guess((0, (1, 2, 3, 9, 8)), ctx)) == 1  # none of it taken: a one-token probe
    la.asked((0, (7,)))  # a node of no guess: no hit
    assert la.guessed == 3 + 6 + 1 and la.taken == 1
    assert Lookahead(0).guess((0, (1,)), ctx) == []


def test_lookahead_streams_adapt_apart() -> None:
    """A sample's greedy path and its tree branch are guessed and judged separately."""
    la = Lookahead(max_tokens=5, first=2)
    ctx = np.array([*range(1, 31), 1, 2])
    greedy = la.guess((0, (1, 2)), ctx, "greedy")
    tree = la.guess((0, (1, 2, 7)), np.array([*range(1, 31), 1, 2, 7]), "tree")  # (2, 7) never seen before
    assert len(greedy) == 2 and tree == []
    la.asked(greedy[0])
    assert len(la.guess((0, (1, 2, 3, 5)), ctx, "greedy")) == 5  # the greedy stream paid: the whole max
    assert la.taken == 1


def test_lookahead_stops_at_the_horizon() -> None:
    """No guess goes past the longest path the stream's program may still ask for."""
    la = Lookahead(max_tokens=6, first=6)
    ctx = np.array([*range(1, 31), 1, 2])
    assert la.guess((0, (1, 2)), ctx, horizon=4) == [(0, (1, 2, 3)), (0, (1, 2, 3, 4))]
    assert la.guess((1, (1, 2)), ctx, horizon=2) == []  # the path's last node: nothing after it
    assert len(la.guess((2, (1, 2)), ctx, horizon=None)) == 6


@pytest.fixture(scope="module")
def trained(trained_tiny_dir: Path):
    lm = load_model(str(trained_tiny_dir), "cpu", "fp32")
    return (lm, *model_view(lm, LLAMA_GUARD_3.codes))


@pytest.mark.parametrize("semantics", ["exact", "paper"])
def test_lookahead_changes_no_output(trained, semantics: str) -> None:
    lm, info, tokens = trained
    texts = ["how do I hurt someone", "steal a car", "Privacy of S13 S1", "bake bread"]
    samples = [Sample(str(i), (Turn("user", t),), (), i + 1) for i, t in enumerate(texts)]
    fmt = load_format("instruct")  # it lists "S1: Violent Crimes", ...: paths find n-grams to continue
    queries = [
        Query(
            s.id,
            prompt_ids(lm.tokenizer, render(lm.tokenizer, fmt, s, LLAMA_GUARD_3)),
            LLAMA_GUARD_3.labels,
            True,
        )
        for s in samples
    ]
    params = dict.fromkeys(REGISTRY, StrategyParams(top_p=0.9, max_new_tokens=12, eps=0.02))
    off, st_off = score(
        lm, info, tokens, queries, list(REGISTRY), params, semantics, EngineOptions("fast", 4, lookahead=0)
    )
    on, st_on = score(
        lm, info, tokens, queries, list(REGISTRY), params, semantics, EngineOptions("fast", 4, lookahead=8)
    )
    for name in REGISTRY:
        for a, b in zip(on[name], off[name]):
            assert_same(a, b, tol=1e-6)
    assert st_off.guessed == 0 and st_on.guessed > 0
    assert st_on.forward_calls <= st_off.forward_calls


@pytest.mark.slow
def test_lookahead_on_smollm2_copying_its_prompt() -> None:
    """With the paper's prompt SmolLM2 answers by copying the taxonomy text: the greedy path's 50
    steps need far fewer model calls, and every output is the same."""
    from tokmarg.config import build_config
    from tokmarg.data import load_dataset

    cfg = build_config(REPO / "examples" / "paper_params.yaml")
    mc = cfg.models[0]
    lm = load_model(mc.name, "cpu", "fp32")
    info, tokens = model_view(lm, cfg.taxonomy.codes)
    ds = load_dataset(REPO / "datasets" / "sample.jsonl", cfg.taxonomy, limit=2)
    fmt = load_format(mc.prompt)
    queries = [
        Query(s.id, prompt_ids(lm.tokenizer, render(lm.tokenizer, fmt, s, cfg.taxonomy)), cfg.taxonomy.labels, True)
        for s in ds.samples
    ]
    names = ["greedy_generation", "token_probability", "marginal_probability_at_any_place"]  # greedy and tree
    off, st_off = score(lm, info, tokens, queries, names, mc.params, "paper", EngineOptions("fast", 2, lookahead=0))
    on, st_on = score(lm, info, tokens, queries, names, mc.params, "paper", EngineOptions("fast", 2))
    for name in names:
        for a, b in zip(on[name], off[name]):
            assert_same(a, b, tol=1e-5)
    assert st_on.guesses_taken > 20
    assert st_on.forward_calls * 2 <= st_off.forward_calls, (st_on.forward_calls, st_off.forward_calls)


def test_guesses_never_pass_what_a_program_asks_for(trained, monkeypatch: pytest.MonkeyPatch) -> None:
    """Greedy paths of 8 tokens ask for paths of at most 7 tokens, trees for at most 8: every
    guessed node stays within that, fewer tokens are guessed than without the horizon, and the
    outputs are the same."""
    lm, info, tokens = trained
    texts = ["how do I hurt someone", "steal a car", "Privacy of S13 S1", "bake bread"]
    fmt = load_format("instruct")
    queries = [
        Query(str(i), prompt_ids(lm.tokenizer, render(lm.tokenizer, fmt, s, LLAMA_GUARD_3)), LLAMA_GUARD_3.labels, True)
        for i, s in enumerate(Sample(str(i), (Turn("user", t),), (), 1) for i, t in enumerate(texts))
    ]
    params = dict.fromkeys(REGISTRY, StrategyParams(top_p=0.9, max_new_tokens=8, eps=0.02))
    guess = Lookahead.guess
    seen: list[tuple[str, int | None, list]] = []

    def recorded(self, node, context, stream="greedy", horizon=None):  # noqa: ANN001, ANN202
        chain = guess(self, node, context, stream, horizon)
        seen.append((stream, horizon, chain))
        return chain

    def unbounded(self, node, context, stream="greedy", horizon=None):  # noqa: ANN001, ANN202
        return guess(self, node, context, stream, None)

    def run(names: list[str]):  # noqa: ANN202
        return score(lm, info, tokens, queries, names, params, "exact", EngineOptions("fast", 4, lookahead=8))

    for names, deepest in ((["greedy_generation"], 7), (["greedy_generation", "marginal_probability_at_any_place"], 8)):
        seen.clear()
        monkeypatch.setattr(Lookahead, "guess", recorded)
        bounded, st = run(names)
        assert max(h for _, h, _ in seen) == deepest  # a node both programs ask for: the longer horizon
        assert all(len(path) <= h for _, h, chain in seen for _, path in chain)
        monkeypatch.setattr(Lookahead, "guess", unbounded)
        free, st_free = run(names)
        assert st.guessed < st_free.guessed
        for name in names:
            for a, b in zip(bounded[name], free[name]):
                assert_same(a, b, tol=1e-6)
