"""Guessing a greedy path ahead, so that several of its steps share one forward (prompt lookup).

A greedy path costs one sequential model call per token; on a GPU, or a CPU reading the weights
from memory, a call costs nearly the same for 10 tokens as for 1. Models often copy their prompt
(an instruct model answering "S1: Violent Crimes\\nResponses that enable..." repeats the
taxonomy it was shown), so the tokens after the path's last n-gram where it occurred before are a
good guess of what comes next, as in transformers' prompt lookup decoding and vLLM's n-gram
speculation. The backend forwards the guessed chain with the node the path asks for; when the
path then asks for a guessed node it is already there, and that step needs no model call. A
wrong guess costs its tokens and changes nothing else: every node's logits are exact (its
attention sees only its own ancestors).

The same goes for a tree whose frontier has narrowed to one branch (a guard's tree past
its first tokens often follows a single likely path). How far to guess adapts per stream (a
sample's greedy path, its tree): the whole ``max_tokens`` after a guess that was taken (in
part), a single token after one that was not, so a path that does not copy costs one token a
step.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

Node = tuple[int, tuple[int, ...]]


def lookup(context: np.ndarray, k: int, ngrams: Sequence[int] = (3, 2)) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the context's last
    n-gram (the longest n that occurs), or none."""
    n_ctx = len(context)
    for n in ngrams:
        if n_ctx <= n or k <= 0:
            continue
        windows = np.lib.stride_tricks.sliding_window_view(context[:-1], n)  # (n_ctx - n, n)
        hits = np.flatnonzero((windows == context[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return context[start : start + k].tolist()
    return []


class Lookahead:
    """Guesses and how far to guess, per stream: a sample's greedy path, or a narrow branch of its
    tree (see the module docstring)."""

    def __init__(self, max_tokens: int, first: int = 4):
        self.max, self.first = max_tokens, first
        self._k: dict[Hashable, int] = {}  # stream -> tokens to guess next time
        self._chain: dict[Hashable, set[Node]] = {}  # stream -> nodes of its last guess
        self._hits: dict[Hashable, int] = {}  # stream -> of them, asked for so far
        self._streams: dict[int, set[Hashable]] = {}  # sample -> its streams
        self.guessed = 0  # tokens guessed
        self.taken = 0  # of them, asked for later

    def asked(self, node: Node) -> None:
        """A program asks for ``node`` (each distinct node once a round)."""
        for stream in self._streams.get(node[0], ()):
            if node in self._chain[stream]:
                self._hits[stream] += 1
                self.taken += 1

    def guess(
        self, node: Node, context: np.ndarray, stream: Hashable = "greedy", horizon: int | None = None
    ) -> list[Node]:
        """The chain of nodes to forward after ``node`` (being forwarded now); ``context``: the
        sample's prompt and the node's path; ``horizon``: the longest path the stream's program
        may ask for (no guess goes past it)."""
        if self.max <= 0:
            return []
        i, path = node
        key = (i, stream)
        k = self._adapt(key)
        if horizon is not None:
            k = min(k, horizon - len(path))
        tokens = lookup(context, k)
        chain = [(i, path + tuple(tokens[: j + 1])) for j in range(len(tokens))]
        self._chain[key], self._hits[key] = set(chain), 0
        self._streams.setdefault(i, set()).add(key)
        self.guessed += len(chain)
        return chain

    def _adapt(self, key: Hashable) -> int:
        """The whole guess after a guess that paid, one token (a cheap probe) after one that did not."""
        if self._chain.get(key):
            self._k[key] = self.max if self._hits[key] > 0 else 1
        return self._k.setdefault(key, min(self.first, self.max))
