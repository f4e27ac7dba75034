"""The seven strategies of SPEC §2, registered by their public names.

Each takes a :class:`Context` (model view, one query, resolved params, semantics) and
returns a :class:`SampleOutput`. The uncertainty strategies also need a dataset-level
threshold: :func:`tokmarg.strategies.uncertainty.finalize` fills their predictions.
"""

from __future__ import annotations

import numpy as np

from tokmarg.probability import (
    code_softmax,
    entropy_uncertainty,
    logtoku_uncertainty,
    probability_uncertainty,
    rank_codes,
)
from tokmarg.strategies import reference as ref
from tokmarg.strategies.base import (
    REGISTRY,
    SEMANTICS,
    Context,
    ModelTokens,
    Query,
    SampleOutput,
    Strategy,
    StrategyParams,
    TokenInfo,
    TokenLM,
    UnknownStrategy,
    get_strategy,
    register,
)

__all__ = [
    "REGISTRY",
    "SEMANTICS",
    "Context",
    "ModelTokens",
    "Query",
    "SampleOutput",
    "Strategy",
    "StrategyParams",
    "TokenInfo",
    "TokenLM",
    "UnknownStrategy",
    "get_strategy",
    "register",
]


def _greedy(ctx: Context) -> tuple[str, dict[str, float], dict[str, float]]:
    q, sp = ctx.query, ctx.params
    if ctx.semantics == "paper":
        return ref.greedy_scores_paper(ctx.lm, ctx.info, q.prompt_ids, q.labels, sp.max_new_tokens)
    path = ref.greedy_path(ctx.lm, ctx.info, q.prompt_ids, sp.max_new_tokens)
    return ref.greedy_scores_exact(ctx.info, path, q.labels)


@register("greedy_generation", "codes")
def greedy_generation(ctx: Context) -> SampleOutput:
    """Codes that occur in the greedy output text (no scores)."""
    text, tok_prob, _ = _greedy(ctx)
    codes = tuple(c for c in ctx.query.codes if c in tok_prob)
    return SampleOutput(None, codes, greedy_text=text)


@register("token_probability", "scores")
def token_probability(ctx: Context) -> SampleOutput:
    """Probability of the tokens spelling each label where it occurs on the greedy path."""
    text, tok_prob, _ = _greedy(ctx)
    return SampleOutput(tok_prob, greedy_text=text)


@register("marginal_probability_at_fixed_place", "scores")
def fixed_place(ctx: Context) -> SampleOutput:
    """Probability of the greedy prefix up to the end of each label's occurrence."""
    text, _, fixed = _greedy(ctx)
    return SampleOutput(fixed, greedy_text=text)


@register("marginal_probability_at_any_place", "scores")
def any_place(ctx: Context) -> SampleOutput:
    """Probability that each label occurs anywhere, summed over a pruned continuation tree."""
    q = ctx.query
    if ctx.semantics == "paper":
        tree = ref.any_place_paper(ctx.lm, ctx.info, q.prompt_ids, q.labels, ctx.params)
        return SampleOutput(tree.scores, extra={"tree_nodes": tree.nodes})
    tree = ref.any_place_exact(ctx.lm, ctx.info, q.prompt_ids, q.labels, ctx.params)
    return SampleOutput(
        tree.scores,
        unexplored_mass=tree.unexplored,
        unexplored_by_label=tree.unexplored_by_label,
        extra={"tree_nodes": tree.nodes},
    )


def _forced(ctx: Context, u_fn: object) -> SampleOutput:
    q = ctx.query
    codes = q.codes
    if ctx.semantics == "paper":
        ev = np.array(ref.forced_evidence_paper(ctx.lm, ctx.tokens, q.prompt_ids, codes))
        gate = ref.verdict_paper(ctx.lm, ctx.tokens, q.prompt_ids) if q.gate else None
        scores = None  # the reference stores no scores for these baselines
    else:
        ev = np.array(ref.forced_evidence_exact(ctx.lm, ctx.info, ctx.tokens, q.prompt_ids, codes))
        gate = ref.verdict_exact(ctx.lm, ctx.info, ctx.tokens, q.prompt_ids) if q.gate else None
        probs = code_softmax(ev)
        scores = {c: float(p) for c, p in zip(codes, probs)}
        if gate is not None:  # P(code) = P(unsafe) x P(code | unsafe)
            scores = {c: gate * p for c, p in scores.items()}
    if scores is not None and gate is not None:
        scores = {"unsafe": gate, **scores}
    return SampleOutput(
        scores,
        uncertainty=u_fn(ev),  # type: ignore[operator]
        ranked=tuple(rank_codes(codes, ev)),
        gate_unsafe=None if gate is None else gate > 0.5,
        extra={"gate_unsafe_score": gate} if gate is not None else {},
    )


@register("probability_uncertainty", "uncertainty")
def prob_uncertainty(ctx: Context) -> SampleOutput:
    """Forced prefix; top-1/top-2 codes by u = 1/(1 + max softmax probability)."""
    return _forced(ctx, probability_uncertainty)


@register("entropy_uncertainty", "uncertainty")
def ent_uncertainty(ctx: Context) -> SampleOutput:
    """Forced prefix; top-1/top-2 codes by u = entropy of the softmax over codes."""
    return _forced(ctx, entropy_uncertainty)


@register("LogTokU", "uncertainty")
def logtoku(ctx: Context) -> SampleOutput:
    """Forced prefix; top-1/top-2 codes by LogTokU evidential uncertainty of the top-2 logits."""
    return _forced(ctx, logtoku_uncertainty)
