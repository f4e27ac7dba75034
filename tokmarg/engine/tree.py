"""The fast engine's backend: tree attention over a shared prefix, node summaries on the device.

Per model the prompt prefix every sample shares is prefilled once. Per batch each sample's own
tokens (the rest of its prompt, then every continuation node the programs ask for, each
forwarded once) are stored per sample and attend only within it (see
:mod:`tokmarg.engine.attention`); a node's position id is its depth in its own sequence
(prompt length + continuation depth), so it computes exactly what a full forward of prompt +
path would. A node's final hidden state is kept; when a program asks for the node, its logits
come from the lm_head in float32 and are reduced on the same device
(:func:`tokmarg.nodestats.reduce_rows`): only the summaries cross to the host.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from tokmarg.engine import DEFAULT_LOOKAHEAD, EngineError
from tokmarg.engine.attention import KWARG, NAME, TreeAttentionError, TreeKV, register
from tokmarg.engine.lookahead import Lookahead
from tokmarg.engine.scheduler import Node, merged_needs
from tokmarg.nodestats import Need, NodeStats, RowSpec, reduce_rows


def text_config(model: torch.nn.Module) -> object:
    """The config of the text model (a multimodal model's ``text_config``, else its own)."""
    cfg = model.config
    return getattr(cfg, "text_config", None) or cfg


def sliding_window(model: torch.nn.Module) -> int | None:
    """The attention window of a sliding-window model (Mistral v0.1, Gemma 2/3, ...), else None."""
    kind, window = local_window(model)
    return window if kind == "sliding-window" else None


def local_window(model: torch.nn.Module) -> tuple[str, int | None]:
    """("sliding-window", W) or ("chunked", C) where some layers attend only locally (Mistral v0.1,
    Gemma 2/3; Llama 4's chunks of 8,192), else ("", None).

    Within W (or C) tokens such a layer sees what full attention sees. The tree attention attends
    over whole sequences, so the fast engine runs such a model only while every sequence fits
    (see ``check_window``)."""
    cfg = text_config(model)
    types = [str(t) for t in getattr(cfg, "layer_types", None) or ()]
    window = getattr(cfg, "sliding_window", None)
    if window and (not types or any("sliding" in t for t in types)):
        return "sliding-window", int(window)
    chunk = getattr(cfg, "attention_chunk_size", None)
    if chunk and (not types or any("chunked" in t for t in types)):
        return "chunked", int(chunk)
    return "", None


def decoder_of(model: torch.nn.Module, name: str = "model") -> torch.nn.Module:
    """The module that returns the final hidden states (``last_hidden_state``). ``get_decoder()``
    misses it where the class's prefix names another attribute (Llama4ForCausalLM: prefix
    ``language_model``, module ``model``) and returns the whole causal LM."""
    dec = model.get_decoder()
    for _ in range(2):  # a causal LM found in place of its decoder (Llama 4's language_model): its .model
        inner = getattr(dec, "model", None)
        if (dec is model or getattr(dec, "lm_head", None) is not None) and isinstance(inner, torch.nn.Module):
            dec = inner
    if dec is model:
        raise EngineError(
            f"model {name!r} ({type(model).__name__}): no decoder module found for the fast engine: "
            "use --engine reference"
        )
    return dec


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


class Fp32Head:
    """The model's output layer in float32 (a bf16 model's logits would be rounded to 8 bits of
    mantissa), with its final logit soft-capping where the config has one."""

    def __init__(self, model: torch.nn.Module):
        head = model.get_output_embeddings()
        self.weight = head.weight.detach().float()  # the same tensor when already float32
        bias = getattr(head, "bias", None)
        self.bias = None if bias is None else bias.detach().float()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.device = self.weight.device

    @classmethod
    def of(cls, model: torch.nn.Module) -> Fp32Head:
        """The model's head, made once per weight tensor (a float32 copy of a bf16 8B model's head
        is 2 GB: one per model, not per batch)."""
        w = model.get_output_embeddings().weight
        have = getattr(model, "_tokmarg_head", None)
        if have is None or have[0] != (w.data_ptr(), w.dtype, w.device):
            have = ((w.data_ptr(), w.dtype, w.device), cls(model))
            model._tokmarg_head = have
        return have[1]

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, hidden) -> (n, vocab) float32 on the head's device."""
        logits = torch.nn.functional.linear(hidden.to(self.device, torch.float32), self.weight, self.bias)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def prepare(model: torch.nn.Module, name: str) -> str:
    """Switch the model to the tree attention (once) and check, on a probe, that the fast path
    gives the model's own logits; returns the implementation it had. Refuses in one line."""
    previous = getattr(model, "_tokmarg_previous_attn", None)
    if previous is not None:
        return previous
    if not getattr(model, "_can_set_attn_implementation", lambda: False)():
        raise EngineError(
            f"model {name!r} ({type(model).__name__}) does not use transformers' attention interface, which the "
            "fast engine's tree attention needs: use --engine reference"
        )
    previous = model.config._attn_implementation
    vocab = model.get_input_embeddings().weight.shape[0]
    probe = tuple(vocab // 3 + 7 * k for k in range(6))  # ordinary tokens: a prefix of 4, an own token, a child
    with torch.inference_mode():
        x = torch.tensor([probe], device=model.get_input_embeddings().weight.device)
        want = model(input_ids=x).logits[0, -2:].float()  # the model's own, with its own attention
    register()
    model.set_attn_implementation(NAME)
    try:
        got = _probe_logits(model, probe)
    except TreeAttentionError as e:
        model.set_attn_implementation(previous)
        raise EngineError(f"model {name!r}: {e}; use --engine reference") from None
    tol = 1e-3 + (1e-4 if model.dtype == torch.float32 else 2e-2) * float(want.abs().max())
    diff = float((got.to(want.device) - want).abs().max())
    if not diff <= tol:
        model.set_attn_implementation(previous)
        raise EngineError(
            f"model {name!r}: the fast engine's logits differ from the model's own by {diff:.3g} on a probe "
            "(an attention or output layer it does not reproduce): use --engine reference"
        )
    model._tokmarg_previous_attn = previous
    return previous


def _probe_logits(model: torch.nn.Module, probe: tuple[int, ...]) -> torch.Tensor:
    backend = TreeBackend(model, model.get_input_embeddings().weight.device, probe[:4], prepared=True)
    backend.begin([probe[:5]], None)
    try:
        backend._forward_nodes([(0, (probe[5],))])
        rows = [backend._rows[(0, ())], backend._rows[(0, (probe[5],))]]
        with torch.inference_mode():
            return backend.head(backend._hidden[rows])
    finally:
        backend.end()


class TreeBackend:
    """Forwards continuation nodes of many samples per call; each node exactly once."""

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        prefix: Sequence[int],
        max_forward_tokens: int = 1024,
        *,
        name: str = "model",
        prepared: bool = False,
        lookahead: int = DEFAULT_LOOKAHEAD,
    ):
        if not prepared:
            prepare(model, name)
        self.model, self.device, self.max_forward = model, device, max(1, max_forward_tokens)
        self.decoder = decoder_of(model, name)
        self.head = Fp32Head.of(model)
        self.kv = TreeKV()
        self.prefix = tuple(prefix)
        self.P = len(self.prefix)
        self.call_log: list[tuple[int, float]] = []  # (tokens, seconds) of each model call after the prefix
        self.model_seconds = 0.0  # wall time in the model: its layers and the lm_head
        self.reduce_seconds = 0.0  # reducing rows on the device and copying the summaries
        self.bytes_to_host = 0
        self.rows_reduced = 0  # node summaries computed
        self.record: dict[Node, NodeStats] | None = None  # set it to keep every summary (checks)
        self.lookahead_tokens = lookahead  # greedy tokens guessed ahead at most (0: none)
        self.lookahead = Lookahead(0)
        self.guessed = self.guesses_taken = 0  # tokens guessed ahead, and of them asked for
        if self.P:
            self._run(np.array(self.prefix), np.arange(self.P))
        self.kv.end_batch()
        self._reset()

    def _reset(self) -> None:
        self._spec: RowSpec | None = None
        self._prompts: list[tuple[int, ...]] = []
        self._plen: list[int] = []
        self._suffix = np.zeros(0, dtype=np.int64)  # (B,) own slots of each prompt suffix
        self._used = np.zeros(0, dtype=np.int64)  # (B,) own slots used
        self._anc = np.zeros((0, 0, 0), dtype=np.int64)  # (B, C, D) tree ancestors of each own slot
        self._slot: dict[Node, int] = {}
        self._rows: dict[Node, int] = {}  # node -> row of its final hidden state
        self._hidden = torch.zeros(0)
        self._stats: dict[Node, tuple[Need, NodeStats]] = {}

    # ------------------------------------------------------------ batch lifecycle

    def begin(self, prompts: Sequence[tuple[int, ...]], spec: RowSpec | None) -> list[int]:
        assert not self._plen, "begin() called twice without end()"
        for i, prompt in enumerate(prompts):
            if tuple(prompt[: self.P]) != self.prefix or len(prompt) <= self.P:
                raise ValueError(f"prompt {i} does not extend the shared prefix")
        self._spec = spec
        self._prompts = [tuple(p) for p in prompts]
        self._plen = [len(p) for p in prompts]
        self.lookahead = Lookahead(self.lookahead_tokens)
        self._suffix = np.array([n - self.P for n in self._plen], dtype=np.int64)
        self._used = self._suffix.copy()
        cap = int(self._suffix.max()) + 64
        self._anc = np.full((len(prompts), cap, 16), -1, dtype=np.int64)
        self.kv.start_batch(len(prompts), cap)
        sample = np.concatenate([np.full(n, i) for i, n in enumerate(self._suffix)])
        slot = np.concatenate([np.arange(n) for n in self._suffix])
        tokens = np.concatenate([np.array(p[self.P :]) for p in prompts])
        for start in range(0, len(tokens), self.max_forward):  # causal chains; a root node's state is its last token's
            sl = slice(start, start + self.max_forward)
            s, k = sample[sl], slot[sl]
            keep = [(int(r), (int(s[r]), ())) for r in np.flatnonzero(k == self._suffix[s] - 1).tolist()]
            self._run(tokens[sl], self.P + k, (s, k, k + 1, None), keep)
        return self._suffix.tolist()

    def release(self, sample: int) -> None:
        """A sample's programs are done: drop its summaries (its K/V stay until ``end``)."""
        for key in [k for k in self._stats if k[0] == sample]:
            del self._stats[key]

    def end(self) -> None:
        self.guessed += self.lookahead.guessed
        self.guesses_taken += self.lookahead.taken
        self.lookahead = Lookahead(0)
        self.kv.end_batch()
        self._reset()

    # ------------------------------------------------------------ requests

    def stats(self, requests: Sequence[Sequence[tuple[Node, Need]]]) -> tuple[dict[Node, NodeStats], list[int]]:
        missing: list[Node] = []
        owner: dict[Node, int] = {}  # a node to forward -> the request group it counts for
        new = []
        for g, group in enumerate(requests):
            count = 0
            for node, _ in group:
                i, path = node
                while path and (i, path) not in self._slot and (i, path) not in owner:
                    owner[(i, path)] = g  # walk up only while the ancestors are missing
                    missing.append((i, path))
                    count += 1
                    path = path[:-1]
            new.append(count)
        needs = merged_needs(requests)
        if self.lookahead.max:
            missing += self._guess_ahead(needs, owner, new)
        if missing:
            self._forward_nodes(missing)
        todo = []
        for node, need in needs.items():
            have = self._stats.get(node)
            if have is None or not have[0].covers(need):
                todo.append((node, need if have is None else have[0] | need))
        if todo:
            self._summarise(todo)
        return {node: st for node, (_, st) in self._stats.items()}, new

    def _guess_ahead(self, needs: dict[Node, Need], owner: dict[Node, int], new: list[int]) -> list[Node]:
        """Nodes guessed ahead (see engine.lookahead) of the greedy steps and single tree branches
        forwarded this round; their tokens count for the group of the node they continue."""
        narrow: dict[int, int] = {}  # sample -> its tree nodes forwarded this round
        for node, need in needs.items():
            self.lookahead.asked(node)
            if need.nuclei and not need.top1 and node in owner:
                narrow[node[0]] = narrow.get(node[0], 0) + 1
        ahead: list[Node] = []
        for node, need in needs.items():
            if node not in owner:
                continue
            if need.top1:
                stream = "greedy"
            elif need.nuclei and narrow[node[0]] == 1:  # a single branch left
                stream = "tree"
            else:
                continue
            guessed = self.lookahead.guess(node, self._context(node), stream, need.horizon)
            chain = [n for n in guessed if n not in self._slot and n not in owner]
            for n in chain:
                owner[n] = owner[node]
            new[owner[node]] += len(chain)
            ahead += chain
        return ahead

    def _context(self, node: Node) -> np.ndarray:
        i, path = node
        return np.array((*self._prompts[i], *path), dtype=np.int64)

    def _forward_nodes(self, nodes: list[Node]) -> None:
        """Forward tree nodes (any order; parents are placed first), in chunks."""
        nodes.sort(key=lambda n: len(n[1]))
        sample = np.array([i for i, _ in nodes], dtype=np.int64)
        depth = np.array([len(p) for _, p in nodes], dtype=np.int64)
        slot = np.empty(len(nodes), dtype=np.int64)
        for j, i in enumerate(sample.tolist()):  # own slots in forward order
            slot[j] = self._used[i]
            self._used[i] += 1
        self._grow(int(self._used.max()), int(depth.max()))
        for j, node in enumerate(nodes):
            self._slot[node] = int(slot[j])
        parent = np.array([self._slot[(i, p[:-1])] if len(p) > 1 else -1 for i, p in nodes], dtype=np.int64)
        anc = np.full((len(nodes), self._anc.shape[2]), -1, dtype=np.int64)
        for d in np.unique(depth).tolist():  # level by level: a parent's row is set before its children's
            at = np.flatnonzero(depth == d)
            if d > 1:
                anc[at] = self._anc[sample[at], parent[at]]
            anc[at, d - 1] = slot[at]
            self._anc[sample[at], slot[at]] = anc[at]
        tokens = np.array([p[-1] for _, p in nodes], dtype=np.int64)
        position = np.array(self._plen, dtype=np.int64)[sample] + depth - 1
        sees = self._suffix[sample]
        for start in range(0, len(nodes), self.max_forward):
            sl = slice(start, start + self.max_forward)
            keep = list(enumerate(nodes[sl]))
            self._run(tokens[sl], position[sl], (sample[sl], slot[sl], sees[sl], anc[sl]), keep)

    def _grow(self, slots: int, depth: int) -> None:
        b, cap, d = self._anc.shape
        if slots <= cap and depth <= d:
            return
        cap2, d2 = max(cap, 2 * cap if slots > cap else cap, slots), max(d, 2 * d if depth > d else d, depth)
        grown = np.full((b, cap2, d2), -1, dtype=np.int64)
        grown[:, :cap, :d] = self._anc
        self._anc = grown
        self.kv.capacity = max(self.kv.capacity, cap2)

    # ------------------------------------------------------------ the model and the reduction

    @torch.inference_mode()
    def _run(
        self,
        tokens: np.ndarray,
        positions: np.ndarray,
        plan: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None] | None = None,
        keep: Sequence[tuple[int, Node]] = (),
    ) -> None:
        """One forward of ``tokens`` at ``positions``. ``plan``: (sample, own slot, sees_upto,
        ancestors) per token (None: the shared prefix); ``keep``: (row, node) whose final hidden
        state to keep."""
        dev = self.device
        if plan is not None:
            sample, slot, sees, anc = plan
            if anc is None:
                anc = np.full((len(tokens), 1), -1, dtype=np.int64)
            self.kv.set_plan(sample, slot, sees, anc, self.kv.capacity, positions)
        t0 = time.perf_counter()
        out = self.decoder(
            input_ids=torch.as_tensor(tokens, device=dev)[None],  # (1, q)
            position_ids=torch.as_tensor(positions, device=dev)[None],  # (1, q)
            attention_mask=_NO_MASK.to(dev),  # a 4D mask: transformers builds none
            use_cache=False,
            **{KWARG: self.kv},
        )
        if keep:
            hidden = out.last_hidden_state[0]  # (q, hidden)
            rows = torch.as_tensor([r for r, _ in keep], device=hidden.device)
            self._store_hidden([node for _, node in keep], hidden[rows])
        if hidden_device(out).type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        self.model_seconds += seconds
        if plan is not None:
            self.call_log.append((len(tokens), seconds))

    def _store_hidden(self, nodes: list[Node], rows: torch.Tensor) -> None:
        n = len(self._rows)
        if self._hidden.shape[0] < n + len(nodes):
            grown = rows.new_empty((max(2 * self._hidden.shape[0], n + len(nodes), 64), rows.shape[1]))
            if n:
                grown[:n] = self._hidden[:n]
            self._hidden = grown
        self._hidden[n : n + len(nodes)] = rows
        for j, node in enumerate(nodes):
            self._rows[node] = n + j

    def _summarise(self, todo: list[tuple[Node, Need]]) -> None:
        """Logits of the nodes from their hidden states (float32 lm_head), reduced on the device."""
        chunk = 256 if self.head.device.type == "cuda" else 16
        todo.sort(key=lambda item: (bool(item[1].nuclei), item[1].watch, item[1].boundary, item[1].top1))
        for start in range(0, len(todo), chunk):  # alike needs side by side: row slices, not copies
            part = todo[start : start + chunk]
            t0 = time.perf_counter()
            with torch.inference_mode():
                logits = self.head(self._hidden[[self._rows[node] for node, _ in part]])  # (n, vocab)
                if logits.device.type == "cuda":
                    torch.cuda.synchronize(logits.device)
                t1 = time.perf_counter()
                got, nbytes = reduce_rows(logits, [need for _, need in part], self._spec)  # type: ignore[arg-type]
            self.model_seconds += t1 - t0
            self.reduce_seconds += time.perf_counter() - t1
            self.bytes_to_host += nbytes
            self.rows_reduced += len(part)
            for (node, need), st in zip(part, got):
                self._stats[node] = (need, st)
                if self.record is not None:
                    self.record[node] = st


def hidden_device(out: object) -> torch.device:
    return out.last_hidden_state.device  # type: ignore[attr-defined]


_NO_MASK = torch.zeros((1, 1, 1, 1), dtype=torch.bool)
