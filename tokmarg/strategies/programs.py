"""The strategies' algorithms as engine-agnostic *programs*.

A program is a generator: it yields a list of requests ``(path, need)`` (a continuation after
the prompt, and what it needs from the next-token distribution there: see
:class:`~tokmarg.nodestats.Need`), receives one :class:`~tokmarg.nodestats.NodeStats` per
request in the same order, and finally returns its result. The reference engine answers each
request with a full forward of prompt + path and reduces the full row on the host; the fast
engine answers the requests of many samples and strategies at once from one cache, forwarding
each distinct node once and reducing on the device. Label matching goes through the context's
matcher (decoding on the reference engine, token-id tables on the fast one). The arithmetic
lives here only, so both engines compute the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tokmarg.nodestats import EXACT, FORCED, PAPER, WATCH, Need, NodeStats, RowSpec
from tokmarg.probability import char_to_token, first_occurrence
from tokmarg.strategies.base import ModelTokens, StrategyParams, TokenInfo

Path = tuple[int, ...]
Request = tuple[Path, Need]
Program = Generator[list[Request], list[NodeStats], object]


def ask(path: Path, need: Need) -> Generator[list[Request], list[NodeStats], NodeStats]:
    """Request one node."""
    (stats,) = yield [(path, need)]
    return stats


def ask_many(paths: Sequence[Path], need: Need) -> Generator[list[Request], list[NodeStats], dict[Path, NodeStats]]:
    """Request several nodes in one round (deduplicated)."""
    uniq = list(dict.fromkeys(paths))
    got = yield [(p, need) for p in uniq]
    return dict(zip(uniq, got))


# ---------------------------------------------------------------- greedy path


def greedy_need(max_new_tokens: int) -> Need:
    """A greedy step's need: the top token; the path asks for nodes up to ``max_new_tokens - 1``
    tokens (the last step reads the node before its last token)."""
    return Need(top1=True, horizon=max_new_tokens - 1)


@dataclass(frozen=True)
class GreedyPath:
    ids: tuple[int, ...]  # generated ids, EOS excluded
    probs: tuple[float, ...]  # probability of each generated id
    ended_by_eos: bool


def greedy_path(info: TokenInfo, max_new_tokens: int) -> Generator[list[Request], list[NodeStats], GreedyPath]:
    """Greedy continuation up to ``max_new_tokens`` tokens or EOS."""
    ids: list[int] = []
    probs: list[float] = []
    need = greedy_need(max_new_tokens)
    for _ in range(max_new_tokens):
        tid, p = (yield from ask(tuple(ids), need)).top1()
        if tid in info.eos_ids:
            return GreedyPath(tuple(ids), tuple(probs), True)
        ids.append(tid)
        probs.append(p)
    return GreedyPath(tuple(ids), tuple(probs), False)


def greedy_scores_exact(
    info: TokenInfo, path: GreedyPath, labels: Sequence[str]
) -> tuple[str, dict[str, float], dict[str, float]]:
    """`exact` scores on the greedy path: (text, token_probability, fixed_place).

    A label's first occurrence (boundary rule, end of text is a boundary) spans tokens
    t_s..t_e; token_probability = prod p[t_s..t_e]; fixed_place = prod p[0..t_e].
    Example (SmolLM2): text ``unsafe\\nS14`` = ``uns``,``afe``,``\\n``,``S``,``1``,``4``:
    S14 spans tokens 3..5; S1 does not occur (followed by the digit 4). One decode per
    prefix of the path, once per sample.
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
    info: TokenInfo, matcher, prompt: Sequence[int], labels: Sequence[str], max_new_tokens: int
) -> Generator[list[Request], list[NodeStats], tuple[str, dict[str, float], dict[str, float]]]:
    """`paper` greedy walk: (generated text, token_probability, fixed_place).

    After each greedy token the whole text (prompt + generation, special tokens kept) is
    tested; the first label in label order that it ends with gets p(token)
    (token_probability) or the running product of matched steps (fixed_place). A later
    match overwrites. Example (SmolLM2, digit-split): ``S``,``1``,``4`` matches S1 at
    ``1`` and then S14 at ``4``, so both score.
    """
    ids: list[int] = []
    tok_prob: dict[str, float] = {}
    fixed: dict[str, float] = {}
    running = 1.0
    state = matcher.paper_root(prompt)
    need = greedy_need(max_new_tokens)
    for _ in range(max_new_tokens):
        tid, prob = (yield from ask(tuple(ids), need)).top1()
        step = matcher.paper_children(state, prompt, ids, np.array([tid], dtype=np.int64))
        state = int(step.states[0])
        ids.append(tid)
        hit = np.flatnonzero(step.ends[0])
        if hit.size:
            label = labels[int(hit[0])]
            tok_prob[label] = prob
            running *= prob
            fixed[label] = running
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
    state: int = 0  # the matcher's state after the path
    seen: np.ndarray | None = None  # (L,) bool: labels already counted on this path (exact)
    pending: int = -1  # label ending at the end of this node's text, not yet seen (exact)


class _ExactTally:
    """Accumulators of the `exact` tree (float64), by label index."""

    def __init__(self, n_labels: int):
        self.scores = np.zeros(n_labels)
        self.unexpl = np.zeros(n_labels)
        self.unexplored = 0.0

    def lose(self, c: float, node: _Node, nb_mass: float | None = None) -> None:
        """``c``: mass left unexplored below this point; ``nb_mass``: of it, the part whose next
        token continues a word (it matters only for the label pending at this node)."""
        self.unexplored += c
        add = np.where(node.seen, 0.0, c)  # type: ignore[arg-type]
        if node.pending >= 0 and nb_mass is not None:
            add[node.pending] = nb_mass
        self.unexpl += add


def any_place_exact(
    info: TokenInfo, matcher, labels: Sequence[str], sp: StrategyParams
) -> Generator[list[Request], list[NodeStats], TreeResult]:
    """`exact` marginal probability that each label occurs anywhere in the output.

    Same nodes as `paper` (nucleus children in order; eps; the two EOS sibling rules) but
    paths stop at ``max_new_tokens`` tokens, each path counts a label once (its first
    occurrence), and an occurrence ending at the end of a node's text counts with the
    node's boundary mass. Worked example (SPEC §2.2): after ``S``,``1`` the next token is
    ``4`` (0.6), ``,`` (0.3) or EOS (0.1): S1 = 1.0 x (0.3 + 0.1) = 0.4, S14 = 0.6.
    For every label: score + unexplored_by_label <= 1 and the true marginal lies in
    [score, score + unexplored_by_label]. Expanded level by level (sums do not depend on
    the visiting order), so an engine can batch a whole level; a node's children are handled
    together (a child below eps is never forwarded: its mass is counted and lost at once).
    """
    tally = _ExactTally(len(labels))
    need = Need(nuclei=((EXACT, sp.top_p),), horizon=sp.max_new_tokens)  # a node that deep ends its path
    need_b = Need(nuclei=need.nuclei, boundary=True, horizon=sp.max_new_tokens)  # a label pending: its boundary mass
    eos = np.array(sorted(info.eos_ids), dtype=np.int64)
    root = _Node((), 1.0, 0, matcher.exact_root(), np.zeros(len(labels), dtype=bool))
    frontier = [root] if root.c >= sp.eps else []
    if not frontier:
        tally.lose(root.c, root)
    nodes = 0
    while frontier:
        got = yield [(n.path, need_b if n.pending >= 0 else need) for n in frontier]
        nodes += len(frontier)
        nxt: list[_Node] = []
        for n, st in zip(frontier, got):
            nxt += _expand_exact(n, st, info, matcher, sp, eos, tally)
        frontier = nxt
    return TreeResult(
        dict(zip(labels, tally.scores.tolist())), tally.unexplored, dict(zip(labels, tally.unexpl.tolist())), nodes
    )


def _expand_exact(
    n: _Node, st: NodeStats, info: TokenInfo, matcher, sp: StrategyParams, eos: np.ndarray, tally: _ExactTally
) -> list[_Node]:
    """One forwarded node: count what it confirms, return its children at or above eps. The
    boundary mass matters only where a label is pending (it was asked for only there)."""
    b_mass = st.boundary_mass if n.pending >= 0 else 0.0
    if n.pending >= 0:  # the occurrence ends here when the next token is a boundary
        tally.scores[n.pending] += n.c * b_mass
    if n.depth == sp.max_new_tokens:
        tally.lose(n.c * (1.0 - st.eos_mass), n, n.c * (1.0 - b_mass))
        return []
    ids, q, eos_in = st.nucleus_of(EXACT, sp.top_p)
    q = q.astype(np.float64)
    is_eos = np.isin(ids, eos)
    if eos_in:  # the sibling rules: children 0, 1 and an EOS child 2 at most
        take = 0
        for i in range(len(ids)):
            if is_eos[i]:
                take = i + 1
                if q[i] >= 0.7 or i == 2:
                    break
                continue
            if i == 2:
                break
            take = i + 1
        ids, q, is_eos = ids[:take], q[:take], is_eos[:take]
    covered = float(q.sum())
    keep = ~is_eos  # an EOS child is a leaf: its mass is covered, nothing left to explore
    ids, q = ids[keep], q[keep]
    is_b = info.boundary_np[ids]
    step = matcher.exact_children(n.state, n.path, ids)
    seen2 = np.repeat(n.seen[None, :], len(ids), axis=0)  # type: ignore[index]
    if n.pending >= 0:
        seen2[is_b, n.pending] = True
    new = step.confirmed & ~seen2  # (k, L)
    c = n.c * q  # (k,) path probability of each child
    tally.scores += c @ new
    seen3 = seen2 | new
    pend = step.pending.copy()
    has = pend >= 0
    pend[has] = np.where(seen3[np.flatnonzero(has), pend[has]], -1, pend[has])
    low = c < sp.eps  # children never forwarded: all their mass is unexplored
    if low.any():
        tally.unexplored += float(c[low].sum())
        tally.unexpl += c[low] @ ~seen3[low]
    out = [
        _Node((*n.path, int(ids[j])), float(c[j]), n.depth + 1, int(step.states[j]), seen3[j], int(pend[j]))
        for j in np.flatnonzero(~low).tolist()
    ]
    covered_nb = float(q[~is_b].sum())
    tally.lose(n.c * max(0.0, 1.0 - covered), n, n.c * max(0.0, (1.0 - b_mass) - covered_nb))
    return out


def _collapse(ids: np.ndarray, probs: np.ndarray, info: TokenInfo) -> tuple[np.ndarray, np.ndarray]:
    """The paper's nucleus keyed by decoded string: tokens that decode alike become one entry
    at the position of the first, with the probability and id of the last."""
    group, shared = info.collapse_group
    if not shared[ids].any():
        return ids, probs
    entries: dict[int, tuple[int, float]] = {}
    for t, p in zip(ids.tolist(), probs.tolist()):
        entries[int(group[t])] = (t, p)
    out = list(entries.values())
    return np.array([t for t, _ in out], dtype=np.int64), np.array([p for _, p in out], dtype=np.float32)


def any_place_paper(
    info: TokenInfo, matcher, prompt: Sequence[int], labels: Sequence[str], sp: StrategyParams
) -> Generator[list[Request], list[NodeStats], TreeResult]:
    """`paper` any-place tree, the reference DFS's arithmetic (SPEC §2.1), level by level.

    A child's label mass c*p is added before any pruning check; the text is the whole
    prompt + path with special tokens; S1 matches inside S14 on a digit-splitting
    tokenizer; a label can be counted on several nodes of one path, so scores can exceed 1.
    """
    scores = np.zeros(len(labels))
    need = Need(nuclei=((PAPER, sp.top_p),), horizon=sp.max_new_tokens)  # a node that deep ends its path
    eos = np.array(sorted(info.eos_ids), dtype=np.int64)
    frontier = [_Node((), 1.0, 0, matcher.paper_root(prompt))] if sp.eps <= 1.0 else []
    nodes = 0
    while frontier:
        got = yield [(n.path, need) for n in frontier]
        nodes += len(frontier)
        nxt: list[_Node] = []
        for n, st in zip(frontier, got):
            ids, q = _collapse(*st.nucleus_of(PAPER, sp.top_p)[:2], info)
            q = q.astype(np.float64)
            is_eos = np.isin(ids, eos)
            take = len(ids)  # children counted: up to an EOS >= 0.7, or child 2 when EOS is a candidate
            stop = np.flatnonzero((is_eos & (q >= 0.7)) | ((np.arange(take) == 2) & is_eos.any()))
            if stop.size:
                take = int(stop[0]) + 1
            expand = ~is_eos[:take]
            if stop.size:
                expand[take - 1] = False  # the child that stops the siblings is counted, not expanded
            ids, q = ids[:take], q[:take]
            step = matcher.paper_children(n.state, prompt, n.path, ids)
            scores += (n.c * q) @ step.ends
            if n.depth == sp.max_new_tokens:
                continue
            for j in np.flatnonzero(expand).tolist():
                c = n.c * float(q[j])
                if c >= sp.eps:
                    nxt.append(_Node((*n.path, int(ids[j])), c, n.depth + 1, int(step.states[j])))
        frontier = nxt
    return TreeResult(dict(zip(labels, scores.tolist())), 0.0, {}, nodes)


# ---------------------------------------------------------------- forced prefix


def _then_boundary(start: Path, rest: Path, got: dict[Path, NodeStats]) -> float:
    """log P(rest, then a boundary | start) from the stats after each step."""
    total = sum(got[start + rest[:i]].logprob(tid) for i, tid in enumerate(rest))
    b = got[start + rest].boundary_mass
    return total + (math.log(b) if b > 0 else -math.inf)


def _steps(start: Path, rest: Path) -> list[Path]:
    return [start + rest[:i] for i in range(len(rest) + 1)]


def forced_evidence_exact(
    tokens: ModelTokens, codes: Sequence[str]
) -> Generator[list[Request], list[NodeStats], list[float]]:
    """Per-code evidence e = z + log P(code's remaining tokens, then a boundary | prefix).

    z is the log-sum-exp of the raw logits after the forced prefix, so a one-token code
    whose boundary is certain gets exactly its raw logit. Example (SmolLM2, prefix ends in
    ``S``): S14 -> z + log p(``1``) + log p(``4`` | ``1``) + log P(boundary | ``14``).
    """
    start = tokens.forced_prefix
    got = yield from ask_many([p for c in codes for p in _steps(start, tokens.code_rest[c])], FORCED)
    z = got[start].lse
    out = []
    for c in codes:
        rest = tokens.code_rest[c]
        if not rest:  # the prefix is the code (no remaining token): e = z + log P(boundary)
            out.append(z + _then_boundary(start, rest, got))
            continue
        # z + log p(first | prefix) is the first token's raw logit: add it as such (no z - z)
        out.append(got[start].logit(rest[0]) + _then_boundary(start + rest[:1], rest[1:], got))
    return out


def forced_evidence_paper(
    tokens: ModelTokens, codes: Sequence[str]
) -> Generator[list[Request], list[NodeStats], list[float]]:
    """The raw logit of ``encode(code)[1]`` after the forced prefix (S1 and S10..S14 share
    the id of ``1`` on a digit-splitting tokenizer, so they tie)."""
    st = yield from ask(tokens.forced_prefix, WATCH)
    return [st.logit(tokens.code_paper_id[c]) for c in codes]


def verdict_exact(tokens: ModelTokens) -> Generator[list[Request], list[NodeStats], float]:
    """P(unsafe) / (P(unsafe) + P(safe)), each the full word followed by a boundary."""
    u, s = tokens.verdict_ids["unsafe"], tokens.verdict_ids["safe"]
    got = yield from ask_many([*_steps((), u), *_steps((), s)], FORCED)
    lu, ls = _then_boundary((), u, got), _then_boundary((), s, got)
    if lu == ls == -math.inf:
        return 0.5
    m = max(lu, ls)
    return math.exp(lu - m) / (math.exp(lu - m) + math.exp(ls - m))


def verdict_paper(tokens: ModelTokens) -> Generator[list[Request], list[NodeStats], float]:
    """Softmax of the first-token logits of ``unsafe`` vs ``safe``; > 0.5 means unsafe."""
    st = yield from ask((), WATCH)
    pair = torch.tensor([st.logit(tokens.verdict_first["unsafe"]), st.logit(tokens.verdict_first["safe"])])
    return float(torch.softmax(pair, dim=0)[0])  # float32, as the reference


def watch_ids(tokens: ModelTokens) -> tuple[int, ...]:
    """Every id whose raw logit the forced-prefix and verdict steps read."""
    ids = {*tokens.code_paper_id.values(), *tokens.verdict_first.values()}
    ids.update(t for rest in (*tokens.code_rest.values(), *tokens.verdict_ids.values()) for t in rest)
    return tuple(sorted(ids))


def row_spec(info: TokenInfo, tokens: ModelTokens) -> RowSpec:
    """The reduction's per-model constants (made once per model view)."""
    key = ("row_spec", id(tokens))
    cached = info._cache.get(key)
    if cached is None or cached[0] is not tokens:
        cached = (tokens, RowSpec(info.boundary, tuple(sorted(info.eos_ids)), watch_ids(tokens)))
        info._cache[key] = cached
    return cached[1]
