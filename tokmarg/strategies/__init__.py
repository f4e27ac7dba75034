"""The seven strategies of SPEC §2, registered by their public names.

Each is a program (see :mod:`tokmarg.strategies.programs`): given a :class:`Context`
(model view, one query, resolved params, semantics) it requests logits and returns a
:class:`SampleOutput`; ``Strategy.run(ctx)`` drives it with the reference engine.
The uncertainty strategies also need a dataset-level threshold:
:func:`tokmarg.strategies.uncertainty.finalize` fills their predictions.
"""

from __future__ import annotations

from collections.abc import Callable, Generator

import numpy as np

from tokmarg.nodestats import NodeStats
from tokmarg.probability import (
    code_softmax,
    entropy_uncertainty,
    logtoku_uncertainty,
    probability_uncertainty,
    rank_codes,
)
from tokmarg.strategies import programs as prog
from tokmarg.strategies.base import (
    CODES,
    KINDS,
    REGISTRY,
    SCORES,
    UNCERTAINTY,
    Context,
    Kind,
    ModelTokens,
    Query,
    SampleOutput,
    Strategy,
    StrategyParams,
    TokenInfo,
    TokenLM,
    register,
)
from tokmarg.strategies.programs import Request

__all__ = [
    "CODES",
    "KINDS",
    "REGISTRY",
    "SCORES",
    "UNCERTAINTY",
    "Kind",
    "Context",
    "ModelTokens",
    "Query",
    "SampleOutput",
    "Strategy",
    "StrategyParams",
    "TokenInfo",
    "TokenLM",
    "register",
]


Out = Generator[list[Request], list[NodeStats], SampleOutput]


def _greedy(ctx: Context) -> Generator[list[Request], list[NodeStats], tuple[str, dict, dict]]:
    q, sp = ctx.query, ctx.params
    if ctx.semantics == "paper":
        m = ctx.label_matcher()
        return (yield from prog.greedy_scores_paper(ctx.info, m, q.prompt_ids, q.labels, sp.max_new_tokens))
    path = yield from prog.greedy_path(ctx.info, sp.max_new_tokens)
    return prog.greedy_scores_exact(ctx.info, path, q.labels)


@register("greedy_generation", CODES)
def greedy_generation(ctx: Context) -> Out:
    """Codes that occur in the greedy output text (no scores)."""
    text, tok_prob, _ = yield from _greedy(ctx)
    codes = tuple(c for c in ctx.query.codes if c in tok_prob)
    # whether the output says unsafe, for the binary safe/unsafe view (it may name no known code)
    return SampleOutput(None, codes, greedy_text=text, extra={"unsafe_in_output": float("unsafe" in tok_prob)})


@register("token_probability", SCORES)
def token_probability(ctx: Context) -> Out:
    """Probability of the tokens spelling each label where it occurs on the greedy path."""
    text, tok_prob, _ = yield from _greedy(ctx)
    return SampleOutput(tok_prob, greedy_text=text)


@register("marginal_probability_at_fixed_place", SCORES)
def fixed_place(ctx: Context) -> Out:
    """Probability of the greedy prefix up to the end of each label's occurrence."""
    text, _, fixed = yield from _greedy(ctx)
    return SampleOutput(fixed, greedy_text=text)


@register("marginal_probability_at_any_place", SCORES)
def any_place(ctx: Context) -> Out:
    """Probability that each label occurs anywhere, summed over a pruned continuation tree."""
    q = ctx.query
    if ctx.semantics == "paper":
        tree = yield from prog.any_place_paper(ctx.info, ctx.label_matcher(), q.prompt_ids, q.labels, ctx.params)
        return SampleOutput(tree.scores, extra={"tree_nodes": tree.nodes})
    tree = yield from prog.any_place_exact(ctx.info, ctx.label_matcher(), q.labels, ctx.params)
    return SampleOutput(
        tree.scores,
        unexplored_mass=tree.unexplored,
        unexplored_by_label=tree.unexplored_by_label,
        extra={"tree_nodes": tree.nodes},
    )


def _forced(ctx: Context, u_fn: Callable[[np.ndarray], float]) -> Out:
    q = ctx.query
    codes = q.codes
    if ctx.semantics == "paper":
        ev = np.array((yield from prog.forced_evidence_paper(ctx.tokens, codes)))
        gate = (yield from prog.verdict_paper(ctx.tokens)) if q.decide_safe else None
        scores = None  # the reference stores no scores for these baselines
    else:
        ev = np.array((yield from prog.forced_evidence_exact(ctx.tokens, codes)))
        gate = (yield from prog.verdict_exact(ctx.tokens)) if q.decide_safe else None
        probs = code_softmax(ev)
        scores = {c: float(p) for c, p in zip(codes, probs)}
        if gate is not None:  # P(code) = P(unsafe) x P(code | unsafe)
            scores = {c: gate * p for c, p in scores.items()}
    if scores is not None and gate is not None:
        scores = {"unsafe": gate, **scores}
    return SampleOutput(
        scores,
        uncertainty=u_fn(ev),
        ranked=tuple(rank_codes(codes, ev)),
        gate_unsafe=None if gate is None else gate > 0.5,
        extra={"gate_unsafe_score": gate} if gate is not None else {},
    )


@register("probability_uncertainty", UNCERTAINTY)
def prob_uncertainty(ctx: Context) -> Out:
    """Forced prefix; top-1/top-2 codes by u = 1/(1 + max softmax probability)."""
    return (yield from _forced(ctx, probability_uncertainty))


@register("entropy_uncertainty", UNCERTAINTY)
def ent_uncertainty(ctx: Context) -> Out:
    """Forced prefix; top-1/top-2 codes by u = entropy of the softmax over codes."""
    return (yield from _forced(ctx, entropy_uncertainty))


@register("LogTokU", UNCERTAINTY)
def logtoku(ctx: Context) -> Out:
    """Forced prefix; top-1/top-2 codes by LogTokU evidential uncertainty of the top-2 logits."""
    return (yield from _forced(ctx, logtoku_uncertainty))
