"""A scripted toy language model for hand-worked strategy tests.

The vocabulary is a handful of strings (id = index; id 0 is EOS, a special token). The
model is a table: the tuple of token strings generated after the prompt -> the next-token
distribution, given either as probabilities ``{token: p}`` (logits = log p) or as raw
logits ``Raw({token: logit})``. Tokens not listed get logit -inf (probability exactly 0).
A context missing from the table raises ``KeyError`` (so a test notices a node it did not
expect to be forwarded) unless a ``default`` distribution is given.

Digits are separate tokens (a SmolLM2-like, digit-splitting tokenizer), so ``S14`` is
``S``, ``1``, ``4``; whole-code tokens ``S1``, ``S2``, ``S4`` and ``unsafe`` also exist for
the Llama-3-like case where every label is one token.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch

from tokmarg.engine.scheduler import MemoBackend, run_batch
from tokmarg.probability import boundary_mask
from tokmarg.strategies import REGISTRY, Context, ModelTokens, Query, SampleOutput, StrategyParams, TokenInfo

VOCAB: tuple[str, ...] = (
    "<eos>",
    "uns",
    "afe",
    "safe",
    "unsafe",
    "\n",
    "S",
    "1",
    "2",
    "4",
    "0",
    "S1",
    "S2",
    "S4",
    ",",
    " ",
    "x",
    "2\n",
)
EOS = "<eos>"
ID: dict[str, int] = {t: i for i, t in enumerate(VOCAB)}
SPECIAL = tuple(t == EOS for t in VOCAB)
TOKEN_TEXTS = tuple("" if sp else t for t, sp in zip(VOCAB, SPECIAL, strict=True))

PROMPT: tuple[str, ...] = ("x", "\n")  # the prompt text "x\n" (ends with a non-word char)
PREFIX: tuple[str, ...] = ("uns", "afe", "\n", "S")  # the forced prefix unsafe\nS


def ids(tokens: Sequence[str]) -> tuple[int, ...]:
    return tuple(ID[t] for t in tokens)


def _decode(token_ids: Sequence[int], skip_special: bool) -> str:
    return "".join(TOKEN_TEXTS[i] if skip_special else VOCAB[i] for i in token_ids)


INFO = TokenInfo(
    token_texts=TOKEN_TEXTS,
    standalone=VOCAB,
    eos_ids=frozenset({ID[EOS]}),
    boundary=boundary_mask(TOKEN_TEXTS, SPECIAL),
    decode=_decode,
)

CODES = ("S1", "S2", "S4", "S10", "S14")
TOKENS = ModelTokens(
    forced_prefix=ids(PREFIX),
    code_rest={c: ids(tuple(c[1:])) for c in CODES},  # digits after the prefix's "S"
    code_paper_id={c: ID[c[1]] for c in CODES},  # encode(code)[1]: the first digit
    verdict_ids={"safe": ids(("safe",)), "unsafe": ids(("uns", "afe"))},
    verdict_first={"safe": ID["safe"], "unsafe": ID["uns"]},
)


class Raw(dict):
    """Raw logits for a context (rather than probabilities)."""


def logits_of(dist: Mapping[str, float]) -> torch.Tensor:
    out = torch.full((len(VOCAB),), -math.inf, dtype=torch.float32)
    if isinstance(dist, Raw):
        for t, z in dist.items():
            out[ID[t]] = z
        return out
    total = sum(dist.values())
    if abs(total - 1.0) > 1e-9:
        raise ValueError(f"toy distribution sums to {total}, not 1: {dist}")
    for t, p in dist.items():
        if p > 0:
            out[ID[t]] = math.log(p)
    return out


class ToyLM:
    """``lm(ids) -> (vocab,) float32 logits`` from a script keyed by the generated suffix."""

    def __init__(
        self,
        script: Mapping[tuple[str, ...], Mapping[str, float]],
        prompt: Sequence[str] = PROMPT,
        default: Mapping[str, float] | None = None,
    ):
        self.script = {tuple(k): v for k, v in script.items()}
        self.prompt = ids(prompt)
        self.default = default
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, token_ids: Sequence[int]) -> torch.Tensor:
        seq = tuple(int(i) for i in token_ids)
        if seq[: len(self.prompt)] != self.prompt:
            raise KeyError(f"toy LM called without its prompt: {seq!r}")
        key = tuple(VOCAB[i] for i in seq[len(self.prompt) :])
        self.calls.append(key)
        dist = self.script.get(key, self.default)
        if dist is None:
            raise KeyError(f"toy LM has no script for context {key!r}")
        return logits_of(dist)


def run(
    strategy: str,
    script: Mapping[tuple[str, ...], Mapping[str, float]],
    semantics: str,
    labels: Sequence[str] = ("unsafe", "S1", "S2", "S4", "S14"),
    gate: bool = False,
    top_p: float = 0.99,
    max_new_tokens: int = 50,
    eps: float = 0.01,
    threshold: float = 0.2,
) -> SampleOutput:
    """Run one registered strategy on the toy model (prompt ``x\\n``).

    Runs it twice, on the reference engine (full rows, decoding) and through the fast engine's
    scheduler, reducer and token-id matcher (each distinct node computed once), and checks both
    give the same output.
    """
    ctx = Context(
        ToyLM(script),
        INFO,
        TOKENS,
        Query("toy", ids(PROMPT), tuple(labels), gate),
        StrategyParams(top_p, max_new_tokens, eps, threshold),
        semantics,
    )
    out = REGISTRY[strategy].run(ctx)
    (fast,) = run_batch(MemoBackend(ToyLM(script)), [[(strategy, replace(ctx, lm=None))]])[0:1]
    assert_same(fast[0], out, tol=1e-6)  # the fast reducer's own float32 arithmetic: a few ulps apart
    return out


def assert_same(a: SampleOutput, b: SampleOutput, tol: float = 0.0, u_tol: float | None = None) -> None:
    """Two engines' outputs agree: scores within ``tol``, everything else equal. ``u_tol``: the
    uncertainty's own absolute tolerance, where the arithmetic bounds it (see test_engine)."""
    assert (a.scores is None) == (b.scores is None)
    if a.scores is not None and b.scores is not None:
        assert a.scores.keys() == b.scores.keys()
        for k in a.scores:
            assert abs(a.scores[k] - b.scores[k]) <= tol, (k, a.scores[k], b.scores[k])
    for f in ("pred_labels", "ranked", "gate_unsafe", "greedy_text"):
        assert getattr(a, f) == getattr(b, f), f
    for f in ("unexplored_mass", "uncertainty"):
        x, y = getattr(a, f), getattr(b, f)
        # u is relative: LogTokU divides by a term near 0 when the top-2 evidence is near 0
        scale = max(1.0, abs(y)) if f == "uncertainty" and y is not None else 1.0
        bound = u_tol if f == "uncertainty" and u_tol is not None else max(tol, 1e-12) * scale
        assert (x is None) == (y is None) and (x is None or abs(x - y) <= bound), (f, x, y, bound)


def logtoku_tolerance(lm, info, tokens, q, rel: float = 1e-5, semantics: str = "exact") -> float:  # noqa: ANN001
    """What the arithmetic guarantees for LogTokU's u between two engines: evidence that agrees to
    ``rel`` of its scale moves u by up to sum_j |du/da_j| x that. u = EU / AU is ill-conditioned
    where a_0 = a_1 + a_2 is near 0 (AU -> 0): with this model's logits (tens, mixed signs) a 1e-6
    change of a logit moved u by 3.5e-5 relative on one machine, 5e-6 on another."""
    import numpy as np

    from tokmarg.probability import logtoku_uncertainty
    from tokmarg.strategies.programs import forced_evidence_exact, forced_evidence_paper, row_spec
    from tokmarg.strategies.reference import drive

    program = (forced_evidence_paper if semantics == "paper" else forced_evidence_exact)(tokens, q.codes)
    ev = np.sort(np.array(drive(program, lm.forward, q.prompt_ids, row_spec(info, tokens))))
    a = ev[-2:]  # the top-2 evidence LogTokU reads
    delta = rel * max(1.0, float(np.abs(a).max()))
    grad = [
        (logtoku_uncertainty(a + h) - logtoku_uncertainty(a - h)) / (2 * delta)
        for h in (np.array([delta, 0.0]), np.array([0.0, delta]))
    ]
    return float(sum(abs(g) for g in grad) * delta) + 1e-9
