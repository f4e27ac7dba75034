"""The reference engine: obviously-right computations, one full forward per step/node.

Every call to the model passes the whole sequence (prompt + path); nothing is cached
across calls except identical requests (see :class:`CountingLM`), which changes no
result. The fast engine is tested against these functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tokmarg.probability import (
    char_to_token,
    first_occurrence,
    label_state,
    nucleus,
    nucleus_paper,
    softmax32,
)
from tokmarg.strategies.base import ModelTokens, StrategyParams, TokenInfo, TokenLM


class CountingLM:
    """Wraps a full-sequence forward; counts the tokens a naive evaluator would forward.

    Identical requests within one sample are answered from a memo (cleared by
    :meth:`reset`) but still counted, so ``tokens`` is the cost of the reference method.
    """

    def __init__(self, forward: Callable[[Sequence[int]], torch.Tensor]):
        self._forward = forward
        self._memo: dict[tuple[int, ...], torch.Tensor] = {}
        self.tokens = 0

    def __call__(self, ids: Sequence[int]) -> torch.Tensor:
        key = tuple(ids)
        self.tokens += len(key)
        if key not in self._memo:
            self._memo[key] = self._forward(key)
        return self._memo[key]

    def reset(self) -> None:
        self._memo.clear()


# ---------------------------------------------------------------- greedy path


@dataclass(frozen=True)
class GreedyPath:
    ids: tuple[int, ...]  # generated ids, EOS excluded
    probs: tuple[float, ...]  # probability of each generated id (EOS step excluded)
    ended_by_eos: bool


def greedy_path(lm: TokenLM, info: TokenInfo, prompt: Sequence[int], max_new_tokens: int) -> GreedyPath:
    """Greedy continuation of ``prompt`` up to ``max_new_tokens`` tokens or EOS."""
    ids: list[int] = []
    probs: list[float] = []
    for _ in range(max_new_tokens):
        p = softmax32(lm([*prompt, *ids]))
        tid = int(torch.argmax(p))
        if tid in info.eos_ids:
            return GreedyPath(tuple(ids), tuple(probs), True)
        ids.append(tid)
        probs.append(float(p[tid]))
    return GreedyPath(tuple(ids), tuple(probs), False)


def greedy_scores_exact(
    info: TokenInfo, path: GreedyPath, labels: Sequence[str]
) -> tuple[str, dict[str, float], dict[str, float]]:
    """`exact` scores on the greedy path: (text, token_probability, fixed_place).

    A label's first occurrence (boundary rule, end of text is a boundary) spans tokens
    t_s..t_e; token_probability = prod p[t_s..t_e]; fixed_place = prod p[0..t_e].
    Example (SmolLM2): text ``unsafe\\nS14`` = ``uns``,``afe``,``\\n``,``S``,``1``,``4``:
    S14 spans tokens 3..5; S1 does not occur (followed by the digit 4).
    """
    text = info.decode(path.ids, True)
    prefix_len = [len(info.decode(path.ids[: i + 1], True)) for i in range(len(path.ids))]
    tok_prob: dict[str, float] = {}
    fixed: dict[str, float] = {}
    for label in labels:
        occ = first_occurrence(text, label)
        if occ is None:
            continue
        t_s, t_e = char_to_token(prefix_len, occ[0]), char_to_token(prefix_len, occ[1] - 1)
        tok_prob[label] = math.prod(path.probs[t_s : t_e + 1])
        fixed[label] = math.prod(path.probs[: t_e + 1])
    return text, tok_prob, fixed


def greedy_scores_paper(
    lm: TokenLM, info: TokenInfo, prompt: Sequence[int], labels: Sequence[str], max_new_tokens: int
) -> tuple[str, dict[str, float], dict[str, float]]:
    """`paper` greedy walk: (generated text, token_probability, fixed_place).

    After each greedy token the whole text (prompt + generation, special tokens kept) is
    decoded; the first label in label order that it ends with gets p(token)
    (token_probability) or the running product of matched steps (fixed_place). A later
    match overwrites. Example (SmolLM2, digit-split): ``S``,``1``,``4`` matches S1 at
    ``1`` and then S14 at ``4``, so both score.
    """
    ids: list[int] = []
    tok_prob: dict[str, float] = {}
    fixed: dict[str, float] = {}
    running = 1.0
    for _ in range(max_new_tokens):
        p = softmax32(lm([*prompt, *ids]))
        tid = int(torch.argmax(p))
        prob = float(p[tid])
        ids.append(tid)
        text = info.decode([*prompt, *ids], False)
        for label in labels:
            if text.endswith(label):
                tok_prob[label] = prob
                running *= prob
                fixed[label] = running
                break
        if tid in info.eos_ids:
            break
    gen = [t for t in ids if t not in info.eos_ids]
    return info.decode(gen, True), tok_prob, fixed


# ---------------------------------------------------------------- any-place tree


@dataclass
class TreeResult:
    scores: dict[str, float]
    unexplored: float  # total mass of subtrees the rules left unexplored
    unexplored_by_label: dict[str, float]  # of it, the mass where the label had not yet occurred
    nodes: int  # forwarded nodes


def any_place_exact(
    lm: TokenLM, info: TokenInfo, prompt: Sequence[int], labels: Sequence[str], sp: StrategyParams
) -> TreeResult:
    """`exact` marginal probability that each label occurs anywhere in the output.

    Same nodes as `paper` (nucleus children in order; eps; the two EOS sibling rules) but
    paths stop at ``max_new_tokens`` tokens, each path counts a label once (its first
    occurrence), and an occurrence ending at the end of a node's text counts with the
    node's boundary mass. Worked example (SPEC §2.2): after ``S``,``1`` the next token is
    ``4`` (0.6), ``,`` (0.3) or EOS (0.1): S1 = 1.0 x (0.3 + 0.1) = 0.4, S14 = 0.6.
    For every label: score + unexplored_by_label <= 1 and the true marginal lies in
    [score, score + unexplored_by_label].
    """
    scores = dict.fromkeys(labels, 0.0)
    unexpl = dict.fromkeys(labels, 0.0)
    res = TreeResult(scores, 0.0, unexpl, 0)

    def lose(c: float, seen: frozenset[str], pending: frozenset[str], nb_mass: float | None = None) -> None:
        # c: mass left unexplored below this point; nb_mass: of it, the part whose next
        # token continues a word (matters only for labels pending at this node).
        res.unexplored += c
        for label in labels:
            if label in seen:
                continue
            unexpl[label] += nb_mass if (label in pending and nb_mass is not None) else c

    def visit(path: list[int], c: float, depth: int, seen: frozenset[str], pending: frozenset[str]) -> None:
        if c < sp.eps:
            lose(c, seen, pending)
            return
        probs = softmax32(lm([*prompt, *path]))  # (vocab,)
        res.nodes += 1
        boundary = info.boundary
        b_mass = float(probs[boundary].sum())
        for label in pending:  # the occurrence ends here when the next token is a boundary
            scores[label] += c * b_mass
        eos_mass = sum(float(probs[e]) for e in info.eos_ids)
        if depth == sp.max_new_tokens:
            lose(c * (1.0 - eos_mass), seen, pending, c * (1.0 - b_mass))
            return
        kids = nucleus(probs, sp.top_p)
        eos_in = any(t in info.eos_ids for t, _ in kids)
        covered = covered_nb = 0.0
        for i, (tid, q) in enumerate(kids):
            if tid in info.eos_ids:  # a leaf: the path ends, nothing left to explore
                covered += q
                if q >= 0.7 or (eos_in and i == 2):
                    break
                continue
            if eos_in and i == 2:  # child 2 is not expanded when EOS is a candidate
                break
            child = [*path, tid]
            is_b = bool(boundary[tid])
            seen2 = seen | pending if is_b else seen
            confirmed, pend = label_state(info.decode(child, True), labels)
            new = confirmed - seen2
            for label in new:
                scores[label] += c * q
            seen3 = seen2 | new
            visit(child, c * q, depth + 1, seen3, pend - seen3)
            covered += q
            covered_nb += 0.0 if is_b else q
        rest = max(0.0, 1.0 - covered)
        lose(c * rest, seen, pending, c * max(0.0, (1.0 - b_mass) - covered_nb))

    visit([], 1.0, 0, frozenset(), frozenset())
    return res


def any_place_paper(
    lm: TokenLM, info: TokenInfo, prompt: Sequence[int], labels: Sequence[str], sp: StrategyParams
) -> TreeResult:
    """`paper` any-place tree, the reference DFS's arithmetic (SPEC §2.1).

    A child's label mass c*p is added before any pruning check; the decoded text is the
    whole prompt + path with special tokens; S1 matches inside S14 on a digit-splitting
    tokenizer; a label can be counted on several nodes of one path, so scores can exceed 1.
    """
    scores = dict.fromkeys(labels, 0.0)
    res = TreeResult(scores, 0.0, {}, 0)

    def visit(path: list[int], c: float, depth: int) -> None:
        if c < sp.eps:
            return
        probs = softmax32(lm([*prompt, *path]))
        res.nodes += 1
        kids = nucleus_paper(probs, sp.top_p, info.standalone)
        eos_in = any(t in info.eos_ids for t, _ in kids)
        for i, (tid, q) in enumerate(kids):
            child = [*path, tid]
            text = info.decode([*prompt, *child], False)
            for label in labels:
                if text.endswith(label):
                    scores[label] += c * q
            is_eos = tid in info.eos_ids
            if is_eos and q >= 0.7:
                break
            if eos_in and i == 2:
                break
            if depth == sp.max_new_tokens or is_eos:
                continue
            visit(child, c * q, depth + 1)

    visit([], 1.0, 0)
    return res


# ---------------------------------------------------------------- forced prefix


def _logprob_then_boundary(lm: TokenLM, info: TokenInfo, start: Sequence[int], rest: Sequence[int]) -> float:
    """log P(rest, then a boundary | start), one forward per step."""
    ids = list(start)
    total = 0.0
    for tid in rest:
        total += float(torch.log_softmax(lm(ids).float(), dim=-1)[tid])
        ids.append(tid)
    b = float(softmax32(lm(ids))[info.boundary].sum())
    return total + (math.log(b) if b > 0 else -math.inf)


def forced_evidence_exact(
    lm: TokenLM, info: TokenInfo, tokens: ModelTokens, prompt: Sequence[int], codes: Sequence[str]
) -> list[float]:
    """Per-code evidence e = z + log P(code's remaining tokens, then a boundary | prefix).

    z is the log-sum-exp of the raw logits after the forced prefix, so a one-token code
    whose boundary is certain gets exactly its raw logit. Example (SmolLM2, prefix ends in
    ``S``): S14 -> z + log p(``1``) + log p(``4`` | ``1``) + log P(boundary | ``14``).
    """
    start = [*prompt, *tokens.forced_prefix]
    z = float(torch.logsumexp(lm(start).float(), dim=-1))
    return [z + _logprob_then_boundary(lm, info, start, tokens.code_rest[c]) for c in codes]


def forced_evidence_paper(lm: TokenLM, tokens: ModelTokens, prompt: Sequence[int], codes: Sequence[str]) -> list[float]:
    """The raw logit of ``encode(code)[1]`` after the forced prefix (S1 and S10..S14 share
    the id of ``1`` on a digit-splitting tokenizer, so they tie)."""
    logits = lm([*prompt, *tokens.forced_prefix])
    return [float(logits[tokens.code_paper_id[c]]) for c in codes]


def verdict_exact(lm: TokenLM, info: TokenInfo, tokens: ModelTokens, prompt: Sequence[int]) -> float:
    """P(unsafe) / (P(unsafe) + P(safe)), each the full word followed by a boundary."""
    lu = _logprob_then_boundary(lm, info, prompt, tokens.verdict_ids["unsafe"])
    ls = _logprob_then_boundary(lm, info, prompt, tokens.verdict_ids["safe"])
    if lu == ls == -math.inf:
        return 0.5
    m = max(lu, ls)
    return math.exp(lu - m) / (math.exp(lu - m) + math.exp(ls - m))


def verdict_paper(lm: TokenLM, tokens: ModelTokens, prompt: Sequence[int]) -> float:
    """Softmax of the first-token logits of ``unsafe`` vs ``safe``; > 0.5 means unsafe."""
    logits = lm(prompt).float()
    pair = torch.stack([logits[tokens.verdict_first["unsafe"]], logits[tokens.verdict_first["safe"]]])
    return float(torch.softmax(pair, dim=0)[0])
