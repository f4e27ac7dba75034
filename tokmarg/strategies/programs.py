"""The strategies' algorithms as engine-agnostic *programs*.

A program is a generator: it yields a list of continuations (token-id tuples after the
prompt) whose next-token logits it needs, receives the list of (vocab,) float32 logits in
the same order, and finally returns its result. The reference engine answers each request
with a full forward of prompt + continuation; the fast engine answers the requests of many
samples and strategies at once from one cache, forwarding each distinct node once. The
arithmetic lives here only, so both engines compute the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field

import torch

from tokmarg.probability import char_to_token, first_occurrence, label_state, nucleus, nucleus_paper, softmax32
from tokmarg.strategies.base import ModelTokens, StrategyParams, TokenInfo

Path = tuple[int, ...]
Program = Generator[list[Path], list[torch.Tensor], object]


def ask(path: Path) -> Generator[list[Path], list[torch.Tensor], torch.Tensor]:
    """Request the logits after one continuation."""
    (logits,) = yield [path]
    return logits


def ask_many(paths: Sequence[Path]) -> Generator[list[Path], list[torch.Tensor], dict[Path, torch.Tensor]]:
    """Request several continuations in one round (deduplicated)."""
    uniq = list(dict.fromkeys(paths))
    got = yield uniq
    return dict(zip(uniq, got))


# ---------------------------------------------------------------- greedy path


@dataclass(frozen=True)
class GreedyPath:
    ids: tuple[int, ...]  # generated ids, EOS excluded
    probs: tuple[float, ...]  # probability of each generated id
    ended_by_eos: bool


def greedy_path(info: TokenInfo, max_new_tokens: int) -> Generator[list[Path], list[torch.Tensor], GreedyPath]:
    """Greedy continuation up to ``max_new_tokens`` tokens or EOS."""
    ids: list[int] = []
    probs: list[float] = []
    for _ in range(max_new_tokens):
        p = softmax32((yield from ask(tuple(ids))))
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
    info: TokenInfo, prompt: Sequence[int], labels: Sequence[str], max_new_tokens: int
) -> Generator[list[Path], list[torch.Tensor], tuple[str, dict[str, float], dict[str, float]]]:
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
        p = softmax32((yield from ask(tuple(ids))))
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


@dataclass(frozen=True)
class _Node:
    path: Path
    c: float  # path probability
    depth: int
    seen: frozenset[str] = field(default_factory=frozenset)  # labels already counted on this path
    pending: frozenset[str] = field(default_factory=frozenset)  # labels ending at the end of this node's text


def any_place_exact(
    info: TokenInfo, labels: Sequence[str], sp: StrategyParams
) -> Generator[list[Path], list[torch.Tensor], TreeResult]:
    """`exact` marginal probability that each label occurs anywhere in the output.

    Same nodes as `paper` (nucleus children in order; eps; the two EOS sibling rules) but
    paths stop at ``max_new_tokens`` tokens, each path counts a label once (its first
    occurrence), and an occurrence ending at the end of a node's text counts with the
    node's boundary mass. Worked example (SPEC §2.2): after ``S``,``1`` the next token is
    ``4`` (0.6), ``,`` (0.3) or EOS (0.1): S1 = 1.0 x (0.3 + 0.1) = 0.4, S14 = 0.6.
    For every label: score + unexplored_by_label <= 1 and the true marginal lies in
    [score, score + unexplored_by_label]. Expanded level by level (sums do not depend on
    the visiting order), so an engine can batch a whole level.
    """
    scores = dict.fromkeys(labels, 0.0)
    unexpl = dict.fromkeys(labels, 0.0)
    res = TreeResult(scores, 0.0, unexpl, 0)

    def lose(c: float, node: _Node, nb_mass: float | None = None) -> None:
        # c: mass left unexplored below this point; nb_mass: of it, the part whose next
        # token continues a word (matters only for labels pending at this node).
        res.unexplored += c
        for label in labels:
            if label not in node.seen:
                unexpl[label] += nb_mass if (label in node.pending and nb_mass is not None) else c

    frontier = [_Node((), 1.0, 0)]
    while frontier:
        for n in frontier:
            if n.c < sp.eps:
                lose(n.c, n)
        live = [n for n in frontier if n.c >= sp.eps]
        if not live:
            break
        got = yield [n.path for n in live]
        res.nodes += len(live)
        frontier = []
        for n, logits in zip(live, got):
            probs = softmax32(logits)  # (vocab,)
            b_mass = float(probs[info.boundary].sum())
            for label in n.pending:  # the occurrence ends here when the next token is a boundary
                scores[label] += n.c * b_mass
            eos_mass = sum(float(probs[e]) for e in info.eos_ids)
            if n.depth == sp.max_new_tokens:
                lose(n.c * (1.0 - eos_mass), n, n.c * (1.0 - b_mass))
                continue
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
                child = (*n.path, tid)
                is_b = bool(info.boundary[tid])
                seen2 = n.seen | n.pending if is_b else n.seen
                confirmed, pend = label_state(info.decode(child, True), labels)
                new = confirmed - seen2
                for label in new:
                    scores[label] += n.c * q
                seen3 = seen2 | new
                frontier.append(_Node(child, n.c * q, n.depth + 1, seen3, pend - seen3))
                covered += q
                covered_nb += 0.0 if is_b else q
            lose(n.c * max(0.0, 1.0 - covered), n, n.c * max(0.0, (1.0 - b_mass) - covered_nb))
    return res


def any_place_paper(
    info: TokenInfo, prompt: Sequence[int], labels: Sequence[str], sp: StrategyParams
) -> Generator[list[Path], list[torch.Tensor], TreeResult]:
    """`paper` any-place tree, the reference DFS's arithmetic (SPEC §2.1), level by level.

    A child's label mass c*p is added before any pruning check; the decoded text is the
    whole prompt + path with special tokens; S1 matches inside S14 on a digit-splitting
    tokenizer; a label can be counted on several nodes of one path, so scores can exceed 1.
    """
    scores = dict.fromkeys(labels, 0.0)
    res = TreeResult(scores, 0.0, {}, 0)
    frontier = [_Node((), 1.0, 0)]
    while frontier:
        live = [n for n in frontier if n.c >= sp.eps]
        if not live:
            break
        got = yield [n.path for n in live]
        res.nodes += len(live)
        frontier = []
        for n, logits in zip(live, got):
            kids = nucleus_paper(softmax32(logits), sp.top_p, info.standalone)
            eos_in = any(t in info.eos_ids for t, _ in kids)
            for i, (tid, q) in enumerate(kids):
                child = (*n.path, tid)
                text = info.decode([*prompt, *child], False)
                for label in labels:
                    if text.endswith(label):
                        scores[label] += n.c * q
                is_eos = tid in info.eos_ids
                if is_eos and q >= 0.7:
                    break
                if eos_in and i == 2:
                    break
                if n.depth == sp.max_new_tokens or is_eos:
                    continue
                frontier.append(_Node(child, n.c * q, n.depth + 1))
    return res


# ---------------------------------------------------------------- forced prefix


def _then_boundary(info: TokenInfo, start: Path, rest: Path, got: dict[Path, torch.Tensor]) -> float:
    """log P(rest, then a boundary | start) from the logits after each step."""
    total = 0.0
    for i, tid in enumerate(rest):
        total += float(torch.log_softmax(got[start + rest[:i]].float(), dim=-1)[tid])
    b = float(softmax32(got[start + rest])[info.boundary].sum())
    return total + (math.log(b) if b > 0 else -math.inf)


def _steps(start: Path, rest: Path) -> list[Path]:
    return [start + rest[:i] for i in range(len(rest) + 1)]


def forced_evidence_exact(
    info: TokenInfo, tokens: ModelTokens, codes: Sequence[str]
) -> Generator[list[Path], list[torch.Tensor], list[float]]:
    """Per-code evidence e = z + log P(code's remaining tokens, then a boundary | prefix).

    z is the log-sum-exp of the raw logits after the forced prefix, so a one-token code
    whose boundary is certain gets exactly its raw logit. Example (SmolLM2, prefix ends in
    ``S``): S14 -> z + log p(``1``) + log p(``4`` | ``1``) + log P(boundary | ``14``).
    """
    start = tokens.forced_prefix
    got = yield from ask_many([p for c in codes for p in _steps(start, tokens.code_rest[c])])
    z = float(torch.logsumexp(got[start].float(), dim=-1))
    return [z + _then_boundary(info, start, tokens.code_rest[c], got) for c in codes]


def forced_evidence_paper(
    tokens: ModelTokens, codes: Sequence[str]
) -> Generator[list[Path], list[torch.Tensor], list[float]]:
    """The raw logit of ``encode(code)[1]`` after the forced prefix (S1 and S10..S14 share
    the id of ``1`` on a digit-splitting tokenizer, so they tie)."""
    logits = yield from ask(tokens.forced_prefix)
    return [float(logits[tokens.code_paper_id[c]]) for c in codes]


def verdict_exact(info: TokenInfo, tokens: ModelTokens) -> Generator[list[Path], list[torch.Tensor], float]:
    """P(unsafe) / (P(unsafe) + P(safe)), each the full word followed by a boundary."""
    u, s = tokens.verdict_ids["unsafe"], tokens.verdict_ids["safe"]
    got = yield from ask_many([*_steps((), u), *_steps((), s)])
    lu, ls = _then_boundary(info, (), u, got), _then_boundary(info, (), s, got)
    if lu == ls == -math.inf:
        return 0.5
    m = max(lu, ls)
    return math.exp(lu - m) / (math.exp(lu - m) + math.exp(ls - m))


def verdict_paper(tokens: ModelTokens) -> Generator[list[Path], list[torch.Tensor], float]:
    """Softmax of the first-token logits of ``unsafe`` vs ``safe``; > 0.5 means unsafe."""
    logits = (yield from ask(())).float()
    pair = torch.stack([logits[tokens.verdict_first["unsafe"]], logits[tokens.verdict_first["safe"]]])
    return float(torch.softmax(pair, dim=0)[0])
