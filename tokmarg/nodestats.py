"""What a strategy reads from one node's next-token distribution, and the two ways to compute it.

A strategy never holds a full-vocabulary row. It asks for a node with a :class:`Need` and
reads a :class:`NodeStats`: the log-sum-exp, the boundary and EOS mass, the most probable
tokens that cover the nuclei it asked for, and raw logits at a few ids. Two reducers build
them, with the same rules (SPEC §2) and the same result:

* :func:`reference_stats`: one full row on the host (softmax, a full stable sort); the
  reference engine uses it, and it is the oracle of the other.
* :func:`reduce_rows`: many rows on the device that computed them, in float32, in one call:
  the tokens above a probability floor, or else a ``topk``, each with a check that the nucleus
  (ties included) lies inside what it kept, escalating to a larger k and then to a full sort
  for the rows where it does not; only the summaries are copied to the host (``bytes``
  counts them).

Pure tensor code: no model, tokenizer or file in here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

EXACT, PAPER = "exact", "paper"


@dataclass(frozen=True)
class Need:
    """What a request needs from its node.

    ``top1``: the most probable token (a greedy step); ``nuclei``: ``(semantics, top_p)`` nuclei
    (a tree node); ``watch``: the raw logits at the model's watch ids (forced prefix, verdict);
    ``boundary``: the boundary mass (where a label may end at the node). The log-sum-exp and the
    EOS probabilities come with every node. ``horizon``: the longest path its program may still
    ask for after this node (None: not known); guesses ahead (engine.lookahead) stop there.
    """

    top1: bool = False
    nuclei: tuple[tuple[str, float], ...] = ()
    watch: bool = False
    boundary: bool = False
    horizon: int | None = None

    def __or__(self, other: Need) -> Need:
        if self == other:
            return self
        nuclei = tuple(dict.fromkeys((*self.nuclei, *other.nuclei)))
        horizon = None if self.horizon is None or other.horizon is None else max(self.horizon, other.horizon)
        return Need(
            self.top1 or other.top1, nuclei, self.watch or other.watch, self.boundary or other.boundary, horizon
        )

    def covers(self, other: Need) -> bool:
        flags = all(mine or not theirs for mine, theirs in zip(self._flags(), other._flags()))
        return flags and set(other.nuclei) <= set(self.nuclei)

    def _flags(self) -> tuple[bool, bool, bool]:
        return self.top1, self.watch, self.boundary


WATCH = Need(watch=True)
FORCED = Need(watch=True, boundary=True)


@dataclass(frozen=True)
class RowSpec:
    """Per-model constants of the reduction. ``boundary`` (vocab,) bool: the token does not
    continue a word; ``eos_ids``: in a fixed order; ``watch_ids``: ids whose raw logits the
    forced-prefix and verdict steps read."""

    boundary: torch.Tensor
    eos_ids: tuple[int, ...]
    watch_ids: tuple[int, ...]
    _on: dict = field(default_factory=dict, compare=False, repr=False)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(boundary as float32, eos ids, watch ids) on ``device``, made once per device."""
        key = str(device)
        if key not in self._on:
            self._on[key] = (
                self.boundary.to(device=device, dtype=torch.float32),
                torch.tensor(self.eos_ids, dtype=torch.long, device=device),
                torch.tensor(self.watch_ids, dtype=torch.long, device=device),
            )
        return self._on[key]


@dataclass(frozen=True)
class NodeStats:
    """One node's next-token distribution as the strategies see it.

    ``top_ids`` / ``top_probs`` (k,): tokens by descending float32 probability, ties lower id
    first (a stable sort), as many as the node's needs require; ``nucleus[(sem, top_p)]`` =
    (its size n, whether an EOS id is among its n tokens). In `exact` semantics with an EOS in
    the nucleus only 3 tokens are kept (the tree looks at no later child).
    """

    lse: float  # log-sum-exp of the raw logits
    boundary_mass: float  # P(the next token does not continue a word); nan unless asked
    eos_probs: tuple[float, ...]  # per RowSpec.eos_ids
    top_ids: np.ndarray  # (k,) int64
    top_probs: np.ndarray  # (k,) float32
    nucleus: dict[tuple[str, float], tuple[int, bool]]
    watch: dict[int, float]  # raw logits at the watch ids (empty unless asked)

    @property
    def eos_mass(self) -> float:
        return sum(self.eos_probs)

    def top1(self) -> tuple[int, float]:
        return int(self.top_ids[0]), float(self.top_probs[0])

    def nucleus_of(self, semantics: str, top_p: float) -> tuple[np.ndarray, np.ndarray, bool]:
        """(ids, probs, eos_in): the nucleus tokens in order (as many as were kept)."""
        n, eos_in = self.nucleus[(semantics, top_p)]
        return self.top_ids[:n], self.top_probs[:n], eos_in

    def logit(self, tid: int) -> float:
        return self.watch[tid]

    def logprob(self, tid: int) -> float:
        return self.watch[tid] - self.lse


# ---------------------------------------------------------------- nucleus rules (SPEC §2, §2.1)


def nucleus_size_exact(sorted_p: torch.Tensor, top_p: float) -> torch.Tensor:
    """Smallest n whose float64 cumulative probability reaches ``top_p``.  (..., k) -> (...)"""
    cum = torch.cumsum(sorted_p.double(), dim=-1)
    target = torch.full((*cum.shape[:-1], 1), top_p, dtype=cum.dtype, device=cum.device)
    return torch.searchsorted(cum, target, right=False)[..., 0] + 1


def nucleus_size_paper(sorted_p: torch.Tensor, top_p: float) -> torch.Tensor:
    """The reference's cut: up to and including the first token at which the float32 cumulative
    probability exceeds ``top_p``.  (..., k) -> (...)"""
    cum = torch.cumsum(sorted_p.float(), dim=-1)
    target = torch.full((*cum.shape[:-1], 1), top_p, dtype=cum.dtype, device=cum.device)
    return torch.searchsorted(cum, target, right=True)[..., 0] + 1


_SIZE = {EXACT: nucleus_size_exact, PAPER: nucleus_size_paper}


def _kept(semantics: str, n: int, eos_in: bool) -> int:
    """Tokens of a nucleus the strategies can look at: in `exact` with an EOS candidate the tree
    takes at most children 0-2 (SPEC §2); `paper` keeps all (its collapse by string needs them)."""
    return min(n, 3) if semantics == EXACT and eos_in else n


# ---------------------------------------------------------------- the oracle: one full row


def reference_stats(logits: torch.Tensor, need: Need, spec: RowSpec) -> NodeStats:
    """Every field from one full (vocab,) row with plain full-row operations. The softmax and
    log-sum-exp run in float64 and the probabilities are rounded to float32: torch's float32
    softmax on a CPU sums a 128k row lane by lane, off by up to 1e-4 on a peaked row."""
    row = logits.float()
    probs = torch.softmax(row.double(), dim=-1).float()
    if need.nuclei:
        sorted_p, order = torch.sort(probs, descending=True, stable=True)
    else:  # a greedy step: the first maximum is the stable sort's first token
        top = int(torch.argmax(probs))
        sorted_p, order = probs[top : top + 1], torch.tensor([top])
    vocab = probs.numel()
    nucleus: dict[tuple[str, float], tuple[int, bool]] = {}
    k = 1 if need.top1 else 0
    eos = set(spec.eos_ids)
    for sem, top_p in need.nuclei:
        n = min(int(_SIZE[sem](sorted_p, top_p)), vocab)
        eos_in = any(int(t) in eos for t in order[:n].tolist())
        nucleus[(sem, top_p)] = (n, eos_in)
        k = max(k, _kept(sem, n, eos_in))
    return NodeStats(
        lse=float(torch.logsumexp(row.double(), dim=-1)),
        boundary_mass=float(probs[spec.boundary].sum()),
        eos_probs=tuple(float(probs[e]) for e in spec.eos_ids),
        top_ids=order[:k].numpy().astype(np.int64),
        top_probs=sorted_p[:k].numpy().astype(np.float32),
        nucleus=nucleus,
        watch={t: float(row[t]) for t in spec.watch_ids} if need.watch else {},
    )


# ---------------------------------------------------------------- on the device: many rows at once


_BLOCK = 128  # tokens per block of the blocked top k


def _block_max(logits: torch.Tensor) -> torch.Tensor | None:
    """Each row's maximum per block of ``_BLOCK`` consecutive ids (the last block may be short);
    None for a vocabulary too small to gain from it.  (R, V) -> (R, ceil(V / _BLOCK))"""
    rows, vocab = logits.shape
    full = vocab // _BLOCK
    if full < 256:
        return None
    out = logits[:, : full * _BLOCK].reshape(rows, full, _BLOCK).amax(dim=-1)
    if vocab > full * _BLOCK:
        out = torch.cat([out, logits[:, full * _BLOCK :].amax(dim=-1, keepdim=True)], dim=1)
    return out


def _first_max(e: torch.Tensor, block_max: torch.Tensor | None, top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's largest ``e`` and its first id (lowest among ties), like ``e.max(-1)``.  With
    ``block_max`` (the logits' block maxima, ``top`` their row maxima) only one block per row is
    read: the first block whose maximum gives the row's largest ``e`` holds its first id."""
    if block_max is None:
        return e.max(dim=-1)
    vocab = e.shape[-1]
    eb = (block_max - top).clamp_(min=-87.0).exp_()  # e of each block's maximum, as e was computed
    first = torch.argmax(eb, dim=-1, keepdim=True)  # argmax: the first occurrence of the maximum
    ids = first * _BLOCK + torch.arange(_BLOCK, device=e.device)  # (r, _BLOCK)
    vals = e.gather(-1, ids.clamp(max=vocab - 1)).masked_fill_(ids >= vocab, -1.0)
    v, j = vals.max(dim=-1)
    return v, ids.gather(-1, j[:, None])[:, 0]


def _scratch(spec: RowSpec, like: torch.Tensor, name: str, rows: int | None = None) -> torch.Tensor | None:
    """A (rows, vocab) float32 buffer kept between calls on a CPU (a fresh 10 MB array costs its
    page faults on every call, more than the arithmetic); None on other devices, whose
    allocators keep their memory anyway (``out=None`` then allocates)."""
    if like.device.type != "cpu":
        return None
    shape = (like.shape[0] if rows is None else rows, like.shape[-1])
    n = shape[0] * shape[1]
    key = ("scratch", name)
    buf = spec._on.get(key)
    if buf is None or buf.numel() < n:
        buf = spec._on[key] = torch.empty(n, dtype=torch.float32)
    return buf[:n].view(shape)


def _sorted_topk(
    probs: torch.Tensor, k: int, block_max: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k of each row by descending probability, ties lower id first.  (r, V) -> 2 x (r, k)

    With ``block_max`` (r, blocks: the maxima of a quantity whose order ``probs`` keeps, such as
    the logits) the candidates are the k blocks of largest maximum: a CPU ``topk`` over a 128k
    row costs several times the pass that made the maxima. Their top k values are the row's: a
    value above the k-th largest t sits in one of fewer than k blocks whose maximum exceeds that
    of every block without one, and k candidates are >= t. Which of the tokens tied *at* t
    came in may differ; the callers' tie check sends such rows on to a larger k."""
    vocab = probs.shape[-1]
    if k >= vocab:
        return torch.sort(probs, dim=-1, descending=True, stable=True)
    if block_max is not None and k <= block_max.shape[-1] // 8:
        _, blocks = torch.topk(block_max, k, dim=-1)  # (r, k)
        offsets = torch.arange(_BLOCK, device=probs.device)
        cand = (blocks[:, :, None] * _BLOCK + offsets).reshape(len(blocks), -1)  # (r, k * _BLOCK)
        vals = probs.gather(-1, cand.clamp(max=vocab - 1)).masked_fill_(cand >= vocab, -1.0)
        v, j = torch.topk(vals, k, dim=-1)
        i = cand.gather(-1, j)
    else:
        v, i = torch.topk(probs, k, dim=-1)  # ties in arbitrary order
    i, perm = torch.sort(i, dim=-1)
    v = v.gather(-1, perm)
    v, perm = torch.sort(v, dim=-1, descending=True, stable=True)
    return v, i.gather(-1, perm)


@dataclass
class _Cut:
    """Nuclei of some rows, cut from their top k."""

    rows: list[int]
    values: torch.Tensor  # (r, k) sorted probabilities
    ids: torch.Tensor  # (r, k)
    sizes: dict[tuple[str, float], torch.Tensor]  # (r,) nucleus size per requested nucleus
    eos_in: dict[tuple[str, float], torch.Tensor]  # (r,) bool
    kept: torch.Tensor  # (r,) tokens to send


def _cut(
    e: torch.Tensor,
    inv: torch.Tensor,
    rows: list[int],
    needs: Sequence[Need],
    k: int,
    eos_ids: torch.Tensor,
    block_max: torch.Tensor | None,
) -> tuple[_Cut, list[int]]:
    """Cut the requested nuclei of ``rows`` from their top k (``e``: unnormalised probabilities,
    ``inv``: 1 / their row sums); return the cut and the rows whose nucleus does not provably lie
    inside the top k (it runs past k, or ties reach k)."""
    sel = _select(rows, e.device)
    v, i = _sorted_topk(e[sel], k, None if block_max is None else block_max[sel])  # (r, k)
    v = v * inv[sel][:, None]  # probabilities, still sorted
    k = v.shape[-1]

    def inside(n: torch.Tensor) -> torch.Tensor:
        if k >= e.shape[-1]:
            return torch.ones_like(n, dtype=torch.bool)
        # every token tied with the last nucleus token must be inside the top k
        last = v.gather(-1, (n.clamp(max=k) - 1)[:, None])[:, 0]
        return (n <= k) & (last > v[:, -1])

    return _nuclei(v, i, rows, needs, eos_ids, e.shape[-1], inside)


def _nuclei(
    v: torch.Tensor,
    i: torch.Tensor,
    rows: list[int],
    needs: Sequence[Need],
    eos_ids: torch.Tensor,
    vocab: int,
    inside: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[_Cut, list[int]]:
    """The requested nuclei of ``rows`` from their sorted leading tokens ``v``/``i`` (r, k);
    ``inside(n)`` says per row whether a nucleus of size n provably lies within them."""
    dev, k = v.device, v.shape[-1]
    ok = torch.ones(len(rows), dtype=torch.bool, device=dev)
    kept = torch.tensor([1 if needs[r].top1 else 0 for r in rows], device=dev)
    sizes, eos_in = {}, {}
    pos = torch.arange(k, device=dev)
    is_eos = torch.isin(i, eos_ids)  # (r, k)
    for key in dict.fromkeys(nk for r in rows for nk in needs[r].nuclei):
        sem, top_p = key
        wants = torch.tensor([key in needs[r].nuclei for r in rows], device=dev)
        n = _SIZE[sem](v, top_p).clamp(max=vocab)  # (r,)
        ok &= inside(n) | ~wants
        e = (is_eos & (pos[None, :] < n[:, None])).any(-1)
        sizes[key], eos_in[key] = n, e
        n_kept = torch.where(e, n.clamp(max=3), n) if sem == EXACT else n
        kept = torch.where(wants, torch.maximum(kept, n_kept.clamp(max=k)), kept)
    bad = [r for r, good in zip(rows, ok.tolist()) if not good]
    return _Cut(rows, v, i, sizes, eos_in, kept), bad


def _select(rows: list[int], device: torch.device) -> slice | torch.Tensor:
    """Index of some rows: a slice (a view, no copy) when they are contiguous."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.tensor(rows, device=device)


def reduce_rows(
    logits: torch.Tensor,
    needs: Sequence[Need],
    spec: RowSpec,
    ks: Sequence[int] = (32, 1024, 8192),
) -> tuple[list[NodeStats], int]:
    """Summaries of float32 rows ``logits`` (R, vocab), on their device; returns them and the
    bytes copied to the host. Equal to :func:`reference_stats` row by row. A nucleus is cut
    from a top k, for each k of ``ks`` in turn, then from a full sort."""
    dev = logits.device
    boundary, eos_ids, watch_ids = spec.on(dev)
    block_max = _block_max(logits)
    top = (logits if block_max is None else block_max).amax(dim=-1, keepdim=True)  # (R, 1)
    # Unnormalised probabilities e = exp(logit - max), in [exp(-87), 1]: a logit more than 87
    # below the maximum is raised to that floor (a subnormal exponential is very slow on a CPU;
    # the floor adds nothing to a float32 sum >= 1). A probability is e / total.
    e = torch.sub(logits, top, out=_scratch(spec, logits, "e")).clamp_(min=-87.0).exp_()  # (R, V)
    # reductions (pairwise, accurate), not a matmul: a float32 dot product over 128k values loses
    # 1e-4 of a peaked row's sum, and a TF32 setting would round it further
    total = e.sum(dim=-1)  # (R,)
    inv = 1.0 / total  # (R,)
    b_mass = torch.full_like(total, float("nan"))
    b_rows = [r for r, n in enumerate(needs) if n.boundary]
    if b_rows:
        sel = _select(b_rows, dev)
        masked = torch.mul(e[sel], boundary, out=_scratch(spec, logits, "boundary", len(b_rows)))
        b_mass[sel] = masked.sum(dim=-1) * inv[sel]
    lse = top[:, 0] + torch.log(total)
    scalars = torch.cat([lse[:, None], b_mass[:, None], e[:, eos_ids] * inv[:, None]], dim=1)  # (R, 2 + E)
    host: list[torch.Tensor] = [scalars]
    watch_rows = [r for r, n in enumerate(needs) if n.watch]
    if watch_rows:
        host.append(logits[_select(watch_rows, dev)][:, watch_ids])  # (w, W) raw logits
    top1_rows = [r for r, n in enumerate(needs) if n.top1 and not n.nuclei]
    if top1_rows:
        sel = _select(top1_rows, dev)
        v, i = _first_max(e[sel], None if block_max is None else block_max[sel], top[sel])
        host += [v * inv[sel], i]
    cuts: list[_Cut] = []
    pending = [r for r, n in enumerate(needs) if n.nuclei]
    for k in (*ks, logits.shape[-1]):  # a larger top k only for the rows whose nucleus needs it
        if not pending:
            break
        cut, pending = _cut(e, inv, pending, needs, k, eos_ids, block_max)
        cuts.append(cut)
    for cut in cuts:
        k = cut.values.shape[-1]
        sel = torch.arange(k, device=dev)[None, :] < cut.kept[:, None]  # (r, k)
        host += [cut.kept, cut.values[sel], cut.ids[sel]]
        host += [x for key in cut.sizes for x in (cut.sizes[key], cut.eos_in[key])]
    moved = [t.cpu() for t in host]
    nbytes = sum(t.numel() * t.element_size() for t in moved)
    return _assemble(moved, needs, spec, watch_rows, top1_rows, cuts), nbytes


def _assemble(
    moved: list[torch.Tensor],
    needs: Sequence[Need],
    spec: RowSpec,
    watch_rows: list[int],
    top1_rows: list[int],
    cuts: list[_Cut],
) -> list[NodeStats]:
    """Host-side: split the copied tensors into one NodeStats per row."""
    it = iter(moved)
    scal = next(it).double().numpy()  # (R, 2 + E)
    watch: dict[int, dict[int, float]] = {}
    if watch_rows:
        w = next(it).tolist()
        watch = {r: dict(zip(spec.watch_ids, vals)) for r, vals in zip(watch_rows, w)}
    empty_i, empty_p = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    tops: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    nuclei: dict[int, dict[tuple[str, float], tuple[int, bool]]] = {}
    if top1_rows:
        p, i = next(it).numpy(), next(it).numpy()
        for j, r in enumerate(top1_rows):
            tops[r] = (i[j : j + 1].astype(np.int64), p[j : j + 1].astype(np.float32))
    for cut in cuts:
        kept, vals, ids = next(it).tolist(), next(it).numpy(), next(it).numpy().astype(np.int64)
        per_key = {key: (next(it).tolist(), next(it).tolist()) for key in cut.sizes}
        start = 0
        for j, r in enumerate(cut.rows):
            tops[r] = (ids[start : start + kept[j]], vals[start : start + kept[j]])
            start += kept[j]
            nuclei[r] = {key: (int(n[j]), bool(e[j])) for key, (n, e) in per_key.items() if key in needs[r].nuclei}
    out = []
    for r in range(len(needs)):
        ids, probs = tops.get(r, (empty_i, empty_p))
        out.append(
            NodeStats(
                lse=float(scal[r, 0]),
                boundary_mass=float(scal[r, 1]),
                eos_probs=tuple(float(x) for x in scal[r, 2:]),
                top_ids=ids,
                top_probs=probs,
                nucleus=nuclei.get(r, {}),
                watch=watch.get(r, {}),
            )
        )
    return out
