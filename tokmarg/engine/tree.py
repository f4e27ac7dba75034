"""Tree attention over one packed KV cache (the fast engine's backend).

Layout of the cache (batch dimension 1):

    [ shared prefix (P tokens, prefilled once per model) | batch tokens appended in order ]

A batch token is a sample's prompt-suffix token or a continuation node. It attends to the
prefix plus its own *visible set*: its sample's suffix tokens up to itself, then its own
ancestors and itself, never another sample's tokens. Its position id is its depth in its
own sequence (prompt length + continuation depth), so each node computes exactly what a
full forward of prompt + path would. After the batch the cache is cropped back to P.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokmarg.engine.scheduler import Node


def sliding_window(model: torch.nn.Module) -> int | None:
    """The attention window of a sliding-window model (Mistral v0.1, Gemma 2/3, ...), else None.

    The packed cache holds a whole batch, so it outgrows any window; the fast engine runs such
    a model only while every sequence fits the window (see ``check_window``)."""
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if window and (types is None or any("sliding" in str(t) for t in types)):
        return int(window)
    return None


def common_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens shared by every prompt, keeping at least one own token per prompt."""
    if not prompts:
        return 0
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return max(0, n)


@dataclass
class _Pending:
    key: Node | None  # None for a suffix token whose logits nobody needs
    sample: int
    token: int
    position: int
    chain: bool  # a prompt-suffix token: sees its sample's earlier suffix tokens


class TreeBackend:
    """Forwards continuation nodes of many samples per call; each node exactly once."""

    def __init__(
        self, model: torch.nn.Module, device: torch.device, prefix: Sequence[int], max_forward_tokens: int = 1024
    ):
        from transformers import DynamicCache

        self.model, self.device, self.max_forward = model, device, max(1, max_forward_tokens)
        self.dtype = next(model.parameters()).dtype
        self.cache = DynamicCache()  # every layer keeps the whole packed cache (see sliding_window)
        self.prefix = tuple(prefix)
        self.P = len(self.prefix)
        self.calls = 0  # model forward calls after the prefix (each a sequential step on a GPU)
        self.model_seconds = 0.0  # wall time in those calls, logits on the host included
        if self.P:
            with torch.inference_mode():
                ids = torch.tensor([self.prefix], device=device)
                model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self._reset()

    def _reset(self) -> None:
        self.n = self.P  # cache length
        self._index: dict[Node, int] = {}  # node -> its cache index
        self._visible: dict[Node, list[int]] = {}  # node -> cache indices it sees (beyond the prefix)
        self._logits: dict[Node, torch.Tensor] = {}
        self._plen: list[int] = []
        self._chain_vis: dict[int, list[int]] = {}  # sample -> cache indices of its suffix so far

    # ------------------------------------------------------------ batch lifecycle

    def begin(self, prompts: Sequence[tuple[int, ...]]) -> list[int]:
        assert not self._plen, "begin() called twice without end()"
        pending: list[_Pending] = []
        for i, prompt in enumerate(prompts):
            if tuple(prompt[: self.P]) != self.prefix or len(prompt) <= self.P:
                raise ValueError(f"prompt {i} does not extend the shared prefix")
            self._plen.append(len(prompt))
            suffix = prompt[self.P :]
            for k, tok in enumerate(suffix):  # a causal chain; only the last token's logits are kept
                key = (i, ()) if k == len(suffix) - 1 else None
                pending.append(_Pending(key, i, tok, self.P + k, chain=True))
        self._forward(pending)
        return [len(p) - self.P for p in prompts]

    def release(self, sample: int) -> None:
        """A sample's programs are done: drop its logits (its KV stays until ``end``)."""
        for key in [k for k in self._logits if k[0] == sample]:
            del self._logits[key]

    def end(self) -> None:
        extra = self.cache.get_seq_length() - self.P
        if extra > 0:
            self.cache.crop(-extra)
        self._reset()

    # ------------------------------------------------------------ requests

    def logits(self, requests: Sequence[Sequence[Node]]) -> tuple[dict[Node, torch.Tensor], list[int]]:
        pending: list[_Pending] = []
        planned: set[Node] = set()
        new = []
        for group in requests:
            count = 0
            for i, path in group:
                for d in range(1, len(path) + 1):  # ancestors first, so a parent precedes its child
                    key = (i, path[:d])
                    if key in self._index or key in planned:
                        continue
                    planned.add(key)
                    pending.append(_Pending(key, i, path[d - 1], self._plen[i] + d - 1, chain=False))
                    count += 1
            new.append(count)
        pending.sort(key=lambda p: len(p.key[1]))  # type: ignore[index]  # by depth
        self._forward(pending)
        return self._logits, new

    # ------------------------------------------------------------ the forward

    @torch.inference_mode()
    def _forward(self, pending: list[_Pending]) -> None:
        for start in range(0, len(pending), self.max_forward):  # bounded work per call
            self._forward_chunk(pending[start : start + self.max_forward])

    def _forward_chunk(self, chunk: list[_Pending]) -> None:
        self.calls += 1
        q = len(chunk)
        rows: list[list[int]] = []  # per token: cache indices it may see beyond the prefix
        for k, item in enumerate(chunk):
            own = self.n + k
            if item.chain:
                vis = self._chain_vis.setdefault(item.sample, [])
                vis.append(own)
                row = list(vis)
            else:
                i, path = item.key  # type: ignore[misc]
                row = [*self._visible[(i, path[:-1])], own]
            rows.append(row)
            if item.key is not None:
                self._visible[item.key] = row
                self._index[item.key] = own
        kv = self.n + q
        mask = torch.full((q, kv), torch.finfo(self.dtype).min, dtype=self.dtype, device=self.device)  # (q, kv)
        mask[:, : self.P] = 0
        r = torch.tensor([k for k, row in enumerate(rows) for _ in row], device=self.device)
        c = torch.tensor([j for row in rows for j in row], device=self.device)
        mask[r, c] = 0
        keep = [k for k, p in enumerate(chunk) if p.key is not None]
        if not keep:
            keep = [q - 1]  # the model needs at least one row of logits
        t0 = time.perf_counter()
        out = self.model(
            input_ids=torch.tensor([[p.token for p in chunk]], device=self.device),  # (1, q)
            position_ids=torch.tensor([[p.position for p in chunk]], device=self.device),  # (1, q)
            attention_mask=mask[None, None],  # (1, 1, q, kv) additive
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=torch.tensor(keep, device=self.device),
        )
        logits = out.logits[0].float().cpu()  # (len(keep), vocab) float32; waits for the device
        self.model_seconds += time.perf_counter() - t0
        for row_logits, k in zip(logits, keep):
            if chunk[k].key is not None:
                self._logits[chunk[k].key] = row_logits  # type: ignore[index]
        self.n = kv
