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
MAX_SCORES = 1 << 25  # float32 attention scores the matmul path materialises at once (128 MB)


class TreeAttentionError(ValueError):
    """The model's attention needs something the tree attention does not do; one line."""


@dataclass
class Plan:
    """One forward's tokens, as index tensors on one device.

    ``sample``, ``slot`` (q,): a token's sample and own slot; the padded layout of the own part:
    ``rows`` (B',) the samples present (``all_rows``: every sample of the batch, in order),
    ``tok_b`` / ``tok_r`` (q,) a token's row and column there, ``n_max`` tokens of the busiest
    sample, ``length`` own slots to attend over; ``mask`` (B', 1, n_max, length) additive (0 where
    a query may look, -inf elsewhere), in the dtype of the queries.
    """

    sample: torch.Tensor
    slot: torch.Tensor
    rows: torch.Tensor
    all_rows: bool
    tok_b: torch.Tensor
    tok_r: torch.Tensor
    n_max: int
    length: int
    mask: torch.Tensor
    positions: torch.Tensor | None = None  # (q,) position ids, where the layer needs them itself


class TreeKV:
    """Keys and values of the prefix and of a batch's own tokens, and the current forward's plan."""

    def __init__(self) -> None:
        self.prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (1, Hkv, P, d) each
        self.own: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (B, Hkv, C, d) each
        self.mode = "prefix"
        self.batch = 0  # samples in the batch
        self.capacity = 0  # own slots per sample
        self._host: dict[str, object] = {}  # the plan on the host (numpy arrays)
        self._plans: dict[tuple[str, torch.dtype], Plan] = {}  # the plan per device and dtype

    def start_batch(self, samples: int, capacity: int) -> None:
        self.own.clear()
        self.mode, self.batch, self.capacity = "tree", samples, capacity

    def end_batch(self) -> None:
        self.own.clear()
        self.mode, self.batch, self.capacity = "prefix", 0, 0
        self._plans.clear()

    def set_plan(self, sample, slot, sees_upto, anc, capacity: int, positions=None) -> None:  # noqa: ANN001
        """The next forward's tokens (numpy arrays): per token its sample, own slot, the own slots
        below which it sees everything (its prompt), its tree ancestors' slots with itself ((q, D),
        -1 pad), and its position id."""
        self.capacity = max(self.capacity, capacity)
        self._host = {"sample": sample, "slot": slot, "sees_upto": sees_upto, "anc": anc, "positions": positions}
        self._plans.clear()

    def plan(self, device: torch.device, dtype: torch.dtype) -> Plan:
        key = (str(device), dtype)
        if key not in self._plans:
            self._plans[key] = _build_plan(self._host, self.batch, device, dtype)
        return self._plans[key]

    def own_kv(self, layer: int, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's own K/V storage (B, Hkv, C, d), allocated or grown to the capacity."""
        have = self.own.get(layer)
        if have is not None and have[0].shape[2] >= self.capacity:
            return have
        shape = (self.batch, key.shape[1], self.capacity, key.shape[3])
        k = torch.zeros(shape, dtype=key.dtype, device=key.device)
        v = torch.zeros(shape, dtype=key.dtype, device=key.device)
        if have is not None:
            n = have[0].shape[2]
            k[:, :, :n], v[:, :, :n] = have
        self.own[layer] = (k, v)
        return k, v


def _build_plan(host: dict, batch: int, device: torch.device, dtype: torch.dtype) -> Plan:
    def t(x) -> torch.Tensor:  # noqa: ANN001
        return torch.as_tensor(x, device=device)

    sample, slot, sees_upto, anc = (t(host[k]) for k in ("sample", "slot", "sees_upto", "anc"))
    rows, tok_b = torch.unique(sample, return_inverse=True)  # (B',), (q,)
    # a token's column within its sample's row: its rank among that sample's tokens
    order = torch.argsort(tok_b, stable=True)
    counts = torch.bincount(tok_b, minlength=len(rows))
    starts = torch.cumsum(counts, 0) - counts
    tok_r = torch.empty_like(tok_b)
    tok_r[order] = torch.arange(len(tok_b), device=device) - starts[tok_b[order]]
    n_max = int(counts.max())
    length = int(torch.maximum(sees_upto, anc.max(dim=1).values + 1).max())
    cols = torch.arange(length + 1, device=device)
    vis = cols[None, :] < sees_upto[:, None]  # (q, length + 1): the prompt part
    vis.scatter_(1, torch.where(anc >= 0, anc, length).long(), True)  # ancestors and self; -1 -> spare column
    allowed = torch.zeros((len(rows), n_max, length), dtype=torch.bool, device=device)
    allowed[:, :, 0] = True  # padding rows look at something (their output is dropped)
    allowed[tok_b, tok_r] = vis[:, :length]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
    all_rows = len(rows) == batch
    positions = None if host.get("positions") is None else t(host["positions"])
    return Plan(sample, slot, rows, all_rows, tok_b, tok_r, n_max, length, mask[:, None], positions)


def _temperature(module: torch.nn.Module, positions: torch.Tensor) -> torch.Tensor:
    """Llama 4's attention temperature of its layers without RoPE, per position (q,) float32."""
    pos = positions.float()
    return torch.log1p(torch.floor((pos + 1.0) / module.floor_scale)) * module.attn_scale + 1.0  # type: ignore[operator]


def retemper(module: torch.nn.Module, query: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Llama 4 scales the queries of its layers without RoPE by a temperature of the position, which
    it takes to be 0, 1, ... of the forward's tokens (plus the cache's length; there is none here).
    A tree forward's tokens sit elsewhere: swap that scale for the one of their own position ids."""
    if not getattr(module, "attn_temperature_tuning", False) or getattr(module, "use_rope", True):
        return query
    if plan.positions is None:
        raise TreeAttentionError("the model's attention scales queries by position; the tree plan has no positions")
    q = query.shape[2]
    assumed = _temperature(module, torch.arange(q, device=query.device))
    ratio = (_temperature(module, plan.positions) / assumed).view(1, 1, q, 1)  # (1, 1, q, 1)
    return (query.float() * ratio).to(query.dtype)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and its float32 log-sum-exp.  q (b, H, n, d), k/v (b, Hkv, L, d), mask
    additive (b, 1, n, L) or None -> out (b, H, n, d), lse (b, H, n).

    On a CPU: torch's fused flash-attention kernel, which returns the log-sum-exp; elsewhere, or
    where it refuses the inputs, the same in matmuls (float32 scores, in chunks)."""
    if q.device.type == "cpu":
        try:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, False, attn_mask=mask, scale=scale
            )
            return out, lse.float()
        except (RuntimeError, AttributeError):
            pass
    return _attend_matmul(q, k, v, mask, scale)


def _attend_matmul(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, n, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    g = h // hkv
    step = max(1, MAX_SCORES // max(1, h * n * length))
    outs, lses = [], []
    for s in range(0, b, step):
        qs = q[s : s + step].float().reshape(-1, hkv, g * n, d)  # grouped query heads share a key head
        scores = (qs @ k[s : s + step].float().transpose(-1, -2)) * scale  # (b', Hkv, g * n, L)
        if mask is not None:
            m = mask[s : s + step].float()  # (b', 1, n, L)
            scores = scores.view(-1, hkv, g, n, length) + m[:, :, None]
            scores = scores.view(-1, hkv, g * n, length)
        lse = torch.logsumexp(scores, dim=-1)  # (b', Hkv, g * n)
        out = torch.exp(scores - lse[..., None]) @ v[s : s + step].float()  # (b', Hkv, g * n, d)
        outs.append(out.view(-1, h, n, d).to(q.dtype))
        lses.append(lse.view(-1, h, n))
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
            raise TreeAttentionError(f"the model's attention uses {unsupported!r}, which tree attention does not do")
    layer = module.layer_idx  # type: ignore[attr-defined]
    if kv.mode == "prefix":  # the shared prefix: plain causal attention, keys kept
        kv.prefix[layer] = (key, value)
        return sdpa_attention_forward(module, query, key, value, None, dropout, scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    plan = kv.plan(query.device, query.dtype)
    query = retemper(module, query, plan)
    own_k, own_v = kv.own_kv(layer, key)
    own_k[plan.sample, :, plan.slot] = key[0].transpose(0, 1)  # (q, Hkv, d)
    own_v[plan.sample, :, plan.slot] = value[0].transpose(0, 1)
    _, h, q, d = query.shape
    qp = query.new_zeros((len(plan.rows), h, plan.n_max, d))  # (B', H, n_max, d)
    qp[plan.tok_b, :, plan.tok_r] = query[0].transpose(0, 1)  # (q, H, d)
    if plan.all_rows:  # a view: no copy of the keys
        ok, ov = own_k[:, :, : plan.length], own_v[:, :, : plan.length]
    else:
        ok, ov = own_k[plan.rows, :, : plan.length], own_v[plan.rows, :, : plan.length]
    out_o, lse_o = attend(qp, ok, ov, plan.mask, scale)
    out_o, lse_o = out_o[plan.tok_b, :, plan.tok_r], lse_o[plan.tok_b, :, plan.tok_r]  # (q, H, d), (q, H)
    if layer in kv.prefix:
        pk, pv = kv.prefix[layer]
        out_p, lse_p = attend(query, pk, pv, None, scale)
        out_p, lse_p = out_p[0].transpose(0, 1), lse_p[0].transpose(0, 1)  # (q, H, d), (q, H)
        m = torch.maximum(lse_o, lse_p)
        wo, wp = torch.exp(lse_o - m)[..., None], torch.exp(lse_p - m)[..., None]
        out = (out_o.float() * wo + out_p.float() * wp) / (wo + wp)
    else:
        out = out_o
    return out.reshape(1, q, h, d).to(query.dtype), None


def register() -> None:
    """Make ``"tokmarg_tree"`` a transformers attention implementation (idempotent)."""
    AttentionInterface.register(NAME, tree_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
