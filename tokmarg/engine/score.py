"""Score queries with every requested strategy on one engine; the runner and bench call this."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tokmarg.engine import EngineError
from tokmarg.engine.scheduler import run_batch
from tokmarg.engine.tree import TreeBackend, common_prefix_len, local_window
from tokmarg.models import LoadedModel
from tokmarg.settings import EngineOptions
from tokmarg.strategies import REGISTRY, Context, ModelTokens, Query, SampleOutput, StrategyParams, TokenInfo
from tokmarg.strategies.base import Semantics
from tokmarg.strategies.reference import CountingLM


@dataclass
class ScoreStats:
    seconds: dict[str, float] = field(default_factory=dict)  # strategy -> wall s (reference); "all" for fast
    prefix_tokens: int = 0  # shared prefix prefilled once (fast)
    forward_calls: int = 0  # model calls after the prefix (fast): the sequential steps
    model_seconds: float = 0.0  # wall time inside those calls and the lm_head (fast)
    reduce_seconds: float = 0.0  # reducing the kept rows on the device, copying the summaries (fast)
    bytes_to_host: int = 0  # what those copies moved (fast)
    nodes: int = 0  # node summaries computed (fast)
    guessed: int = 0  # greedy tokens forwarded ahead of their step (fast, see engine.lookahead)
    guesses_taken: int = 0  # of them, asked for later
    calls: list[tuple[int, float]] = field(default_factory=list)  # (tokens, seconds) per model call (fast)


def check_window(
    lm: LoadedModel, tokens: ModelTokens, queries: Sequence[Query], params: dict[str, StrategyParams]
) -> None:
    """A sliding-window (or chunked) model runs on the fast engine only while every sequence fits its window:
    within the window its local layers see what full attention sees, so the packed cache (which
    outgrows any window) gives the model's own logits. Past it they would not: refuse."""
    kind, window = local_window(lm.model)
    if not window or not queries:
        return
    # an upper bound on what any strategy appends: generated tokens, or a forced prefix, a code's
    # remaining tokens and a verdict
    new = (
        max((p.max_new_tokens for p in params.values()), default=0)
        + len(tokens.forced_prefix)
        + max((len(r) for r in tokens.code_rest.values()), default=0)
        + max((len(v) for v in tokens.verdict_ids.values()), default=0)
    )
    q = max(queries, key=lambda q: len(q.prompt_ids))
    if len(q.prompt_ids) + new > window:
        raise EngineError(
            f"model {lm.name!r} uses {kind} attention (window {window}) and sample {q.sample_id} needs "
            f"{len(q.prompt_ids)} prompt + {new} new tokens; the fast engine is exact only within the window: "
            "use --engine reference (or a shorter prompt)"
        )


def score(
    lm: LoadedModel,
    info: TokenInfo,
    tokens: ModelTokens,
    queries: Sequence[Query],
    strategies: Sequence[str],
    params: dict[str, StrategyParams],
    semantics: Semantics,
    opts: EngineOptions,
    on_done: Callable[[str, int], None] | None = None,
    max_prefix: int | None = None,
) -> tuple[dict[str, list[SampleOutput]], ScoreStats]:
    """Outputs per strategy (in query order) and timing; ``on_done(strategy, n)`` reports progress.

    ``max_prefix`` caps the shared prefix prefilled once (e.g. at the prompt template's static
    text), so a sample's token count does not depend on which other samples share its call.
    """

    def context(forward: CountingLM | None, q: Query, s: str) -> Context:
        return Context(forward, info, tokens, q, params[s], semantics)

    if opts.engine == "reference":
        return _score_reference(lm, context, queries, strategies, on_done)
    check_window(lm, tokens, queries, {s: params[s] for s in strategies})
    outs: dict[str, list[SampleOutput]] = {s: [] for s in strategies}
    stats = ScoreStats({"all": 0.0})
    batch, max_fwd = opts.resolved(lm.device.type == "cuda")
    t0 = time.perf_counter()
    prompts = [q.prompt_ids for q in queries]
    p = common_prefix_len(prompts)
    if max_prefix is not None:
        p = min(p, max_prefix)
    prefix = prompts[0][:p] if prompts else ()
    backend = TreeBackend(lm.model, lm.device, prefix, max_fwd, name=lm.name, lookahead=opts.lookahead)
    stats.prefix_tokens = p
    for start in range(0, len(queries), batch):
        chunk = queries[start : start + batch]
        rows = run_batch(backend, [[(s, context(None, q, s)) for s in strategies] for q in chunk])
        for row in rows:
            for s, out in zip(strategies, row):
                outs[s].append(out)
        if on_done:
            for s in strategies:
                on_done(s, len(chunk))
    stats.seconds["all"] = time.perf_counter() - t0
    stats.forward_calls, stats.model_seconds = len(backend.call_log), backend.model_seconds
    stats.reduce_seconds, stats.bytes_to_host = backend.reduce_seconds, backend.bytes_to_host
    stats.nodes = backend.rows_reduced
    stats.guessed, stats.guesses_taken = backend.guessed, backend.guesses_taken
    stats.calls = backend.call_log
    return outs, stats


def _score_reference(
    lm: LoadedModel,
    context: Callable[[CountingLM, Query, str], Context],
    queries: Sequence[Query],
    strategies: Sequence[str],
    on_done: Callable[[str, int], None] | None,
) -> tuple[dict[str, list[SampleOutput]], ScoreStats]:
    """Each strategy on its own, as the paper's code runs them: full forwards, timed apart."""
    outs: dict[str, list[SampleOutput]] = {s: [] for s in strategies}
    stats = ScoreStats(dict.fromkeys(strategies, 0.0))
    for q in queries:
        for s in strategies:
            lmc = CountingLM(lm.forward)
            t0 = time.perf_counter()
            out = REGISTRY[s].run(context(lmc, q, s))
            stats.seconds[s] += time.perf_counter() - t0
            out.tokens_forwarded = lmc.tokens
            outs[s].append(out)
            if on_done:
                on_done(s, 1)
    return outs, stats
