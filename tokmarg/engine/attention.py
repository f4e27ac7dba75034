"""Tree attention for the fast engine, as a function in transformers' attention registry.

Registered as ``"tokmarg_tree"`` (with sdpa's mask function), so an ordinary forward of a model
switched to it is exactly sdpa. A forward whose keyword arguments carry a :class:`TreeKV` is a
tree forward: the layer's new keys and values are stored in it, and attention follows its plan.

Layout, per layer (kept in the :class:`TreeKV`, on the layer's own device):

    prefix  K/V (Hkv, P, d)     the prompt prefix every sample shares, computed once per model
    own     K/V (B, C, Hkv, d)  each sample's own tokens: its prompt suffix, then tree nodes, in
                                the order they were forwarded (slot j of sample b)

A new token of sample b sees the whole prefix, its sample's slots < ``sees_upto`` (the suffix:
causally while it is being prefilled, all of it from a tree node) and its tree ancestors and
itself (``anc``). The two parts are computed apart and merged by their log-sum-exp (as
Hydragen does): the prefix in one matmul for every token of the forward, each sample's own part
over its own slots only. A forward costs O(tokens x (P + own length)), linear in the batch;
masks are built on the device from the ancestor table, once per forward and device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "tokmarg_tree"
KWARG = "tokmarg_tree"
MAX_SCORES = 1 << 25  # float32 attention scores materialised at once (128 MB)


class TreeAttentionError(ValueError):
    """The model's attention needs something the tree attention does not do; one line."""


@dataclass
class Plan:
    """One forward's tokens, as index tensors on one device.

    ``sample``, ``slot``, ``sees_upto`` (q,); ``anc`` (q, D) own slots of a token's tree
    ancestors and itself, -1 padded; the padded layout of the own part: ``rows`` (B',) the
    samples present, ``tok_b`` / ``tok_r`` (q,) a token's row and column there, ``n_max``
    tokens of the busiest sample, ``length`` own slots to attend over; ``mask`` (B', n_max,
    length) bool, True where a query may look.
    """

    sample: torch.Tensor
    slot: torch.Tensor
    rows: torch.Tensor
    tok_b: torch.Tensor
    tok_r: torch.Tensor
    n_max: int
    length: int
    mask: torch.Tensor


class TreeKV:
    """Keys and values of the prefix and of a batch's own tokens, and the current forward's plan."""

    def __init__(self) -> None:
        self.prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (Hkv, P, d) each
        self.own: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (B, C, Hkv, d) each
        self.mode = "prefix"
        self.batch = 0  # samples in the batch
        self.capacity = 0  # own slots per sample
        self._host: dict[str, object] = {}  # the plan on the host (numpy / ints)
        self._plans: dict[str, Plan] = {}  # the plan per device

    def start_batch(self, samples: int, capacity: int) -> None:
        self.own.clear()
        self.mode, self.batch, self.capacity = "tree", samples, capacity

    def end_batch(self) -> None:
        self.own.clear()
        self.mode, self.batch, self.capacity = "prefix", 0, 0
        self._plans.clear()

    def set_plan(self, sample, slot, sees_upto, anc, capacity: int) -> None:  # noqa: ANN001 - numpy arrays
        """The next forward's tokens (numpy arrays on the host, see :class:`Plan`)."""
        self.capacity = max(self.capacity, capacity)
        self._host = {"sample": sample, "slot": slot, "sees_upto": sees_upto, "anc": anc}
        self._plans.clear()

    def plan(self, device: torch.device) -> Plan:
        key = str(device)
        if key not in self._plans:
            self._plans[key] = _build_plan(self._host, device)
        return self._plans[key]

    def own_kv(self, layer: int, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's own K/V storage, allocated or grown to the batch's capacity."""
        have = self.own.get(layer)
        if have is not None and have[0].shape[1] >= self.capacity:
            return have
        shape = (self.batch, self.capacity, key.shape[1], key.shape[3])
        k = torch.zeros(shape, dtype=key.dtype, device=key.device)
        v = torch.zeros(shape, dtype=key.dtype, device=key.device)
        if have is not None:
            n = have[0].shape[1]
            k[:, :n], v[:, :n] = have
        self.own[layer] = (k, v)
        return k, v


def _build_plan(host: dict, device: torch.device) -> Plan:
    def t(x) -> torch.Tensor:  # noqa: ANN001
        return torch.as_tensor(x, device=device)

    sample, slot, sees_upto, anc = (t(host[k]) for k in ("sample", "slot", "sees_upto", "anc"))
    rows, tok_b = torch.unique(sample, return_inverse=True)  # (B',), (q,)
    # a token's column within its sample's rows: its rank among that sample's tokens
    order = torch.argsort(tok_b, stable=True)
    counts = torch.bincount(tok_b, minlength=len(rows))
    starts = torch.cumsum(counts, 0) - counts
    tok_r = torch.empty_like(tok_b)
    tok_r[order] = torch.arange(len(tok_b), device=device) - starts[tok_b[order]]
    n_max = int(counts.max())
    length = int(torch.maximum(sees_upto, anc.max(dim=1).values + 1).max())
    cols = torch.arange(length + 1, device=device)
    vis = cols[None, :] < sees_upto[:, None]  # (q, length + 1): the suffix part
    vis.scatter_(1, torch.where(anc >= 0, anc, length).long(), True)  # tree ancestors and self; -1 -> spare column
    mask = torch.zeros((len(rows), n_max, length), dtype=torch.bool, device=device)
    mask[:, :, 0] = True  # padding rows look at something (their output is dropped)
    mask[tok_b, tok_r] = vis[:, :length]
    return Plan(sample, slot, rows, tok_b, tok_r, n_max, length, mask)


def _softmax_parts(scores: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention output, log-sum-exp) of float32 scores (..., q, k) over values (..., k, d)."""
    lse = torch.logsumexp(scores, dim=-1)  # (..., q)
    out = torch.exp(scores - lse[..., None]) @ v  # (..., q, d)
    return out, lse


def _prefix_part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query against the shared prefix.  q (Hkv, g, n, d), k/v (Hkv, P, d) ->
    out (Hkv, g, n, d), lse (Hkv, g, n)."""
    hkv, g, n, d = q.shape
    kf, vf = k.float(), v.float()
    step = max(1, MAX_SCORES // max(1, hkv * g * k.shape[1]))
    outs, lses = [], []
    for s in range(0, n, step):
        qs = q[:, :, s : s + step].float().reshape(hkv, -1, d)  # (Hkv, g * n', d)
        o, lse = _softmax_parts((qs @ kf.transpose(-1, -2)) * scale, vf)
        outs.append(o.view(hkv, g, -1, d))
        lses.append(lse.view(hkv, g, -1))
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _own_part(
    qp: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's queries against its own slots.  qp (B', Hkv, g, n, d), k/v (B', L, Hkv, d),
    mask (B', n, L) -> out (B', Hkv, g, n, d), lse (B', Hkv, g, n)."""
    b, hkv, g, n, d = qp.shape
    length = k.shape[1]
    step = max(1, MAX_SCORES // max(1, hkv * g * n * length))
    outs, lses = [], []
    for s in range(0, b, step):
        kf = k[s : s + step].float().transpose(1, 2)  # (b', Hkv, L, d)
        vf = v[s : s + step].float().transpose(1, 2)
        qs = qp[s : s + step].float().reshape(-1, hkv, g * n, d)
        scores = (qs @ kf.transpose(-1, -2)) * scale  # (b', Hkv, g * n, L)
        m = mask[s : s + step, None, None].expand(-1, 1, g, n, length).reshape(-1, 1, g * n, length)
        o, lse = _softmax_parts(scores.masked_fill(~m, float("-inf")), vf)
        outs.append(o.view(-1, hkv, g, n, d))
        lses.append(lse.view(-1, hkv, g, n))
    return torch.cat(outs), torch.cat(lses)


def tree_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query (1, H, q, d), key/value (1, Hkv, q, d) of the new
    tokens; returns (1, q, H, d). Without a :class:`TreeKV` in ``kwargs``: sdpa."""
    kv: TreeKV | None = kwargs.pop(KWARG, None)
    if kv is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    for unsupported in ("softcap", "s_aux", "sinks"):
        if kwargs.get(unsupported) is not None:
            raise TreeAttentionError(
                f"the model's attention uses {unsupported!r}, which the tree attention does not do"
            )
    layer = module.layer_idx  # type: ignore[attr-defined]
    if kv.mode == "prefix":  # the shared prefix: plain causal attention, keys kept
        kv.prefix[layer] = (key[0], value[0])
        return sdpa_attention_forward(module, query, key, value, None, dropout, scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    plan = kv.plan(query.device)
    own_k, own_v = kv.own_kv(layer, key)
    own_k[plan.sample, plan.slot] = key[0].transpose(0, 1)  # (q, Hkv, d)
    own_v[plan.sample, plan.slot] = value[0].transpose(0, 1)
    _, h, q, d = query.shape
    hkv = key.shape[1]
    g = h // hkv
    qh = query[0].view(hkv, g, q, d)
    qp = query.new_zeros((len(plan.rows), plan.n_max, hkv, g, d))
    qp[plan.tok_b, plan.tok_r] = qh.permute(2, 0, 1, 3)  # (q, Hkv, g, d)
    rows = plan.rows
    out_o, lse_o = _own_part(
        qp.permute(0, 2, 3, 1, 4), own_k[rows, : plan.length], own_v[rows, : plan.length], plan.mask, scale
    )
    out_o = out_o.permute(0, 3, 1, 2, 4)[plan.tok_b, plan.tok_r]  # (q, Hkv, g, d)
    lse_o = lse_o.permute(0, 3, 1, 2)[plan.tok_b, plan.tok_r]  # (q, Hkv, g)
    if layer in kv.prefix:
        pk, pv = kv.prefix[layer]
        out_p, lse_p = _prefix_part(qh, pk, pv, scale)
        out_p, lse_p = out_p.permute(2, 0, 1, 3), lse_p.permute(2, 0, 1)  # (q, Hkv, g, d), (q, Hkv, g)
        m = torch.maximum(lse_o, lse_p)
        wo, wp = torch.exp(lse_o - m), torch.exp(lse_p - m)
        out = (out_o * wo[..., None] + out_p * wp[..., None]) / (wo + wp)[..., None]
    else:
        out = out_o
    return out.reshape(1, q, h, d).to(query.dtype), None


def register() -> None:
    """Make ``"tokmarg_tree"`` a transformers attention implementation (idempotent)."""
    AttentionInterface.register(NAME, tree_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
