"""Drive the programs of many (sample, strategy) pairs together against one backend.

Each round collects every pending request, asks the backend for all of them at once (it
forwards only nodes it has not seen), and resumes every program. Tokens forwarded are
attributed to the first program (in the given order) that needed them.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from tokmarg.nodestats import Need, NodeStats, RowSpec, reduce_rows
from tokmarg.strategies import REGISTRY, Context, SampleOutput
from tokmarg.strategies.programs import row_spec

Node = tuple[int, tuple[int, ...]]  # (sample index in the batch, continuation after its prompt)


class Backend(Protocol):
    def begin(self, prompts: Sequence[tuple[int, ...]], spec: RowSpec) -> list[int]:
        """Prefill the batch's prompts; return the tokens forwarded per sample."""

    def stats(self, requests: Sequence[Sequence[tuple[Node, Need]]]) -> tuple[dict[Node, NodeStats], list[int]]:
        """Stats for every requested node (each computed for the union of what it was asked
        for), and the tokens newly forwarded for each request group (a node and its missing
        ancestors count for the first group that needs them)."""

    def release(self, sample: int) -> None:
        """Every program of this sample is done: its nodes' stats may be dropped."""

    def end(self) -> None:
        """Forget the batch (the shared prefix stays)."""


@dataclass
class _Job:
    sample: int
    gen: Generator
    request: list[tuple[tuple[int, ...], Need]] | None = None
    result: SampleOutput | None = None
    tokens: int = 0

    def step(self, answer: list[NodeStats] | None) -> None:
        try:
            self.request = next(self.gen) if answer is None else self.gen.send(answer)
        except StopIteration as stop:
            self.request, self.result = None, stop.value


def run_batch(backend: Backend, contexts: Sequence[Sequence[tuple[str, Context]]]) -> list[list[SampleOutput]]:
    """``contexts[i][j]``: (strategy name, context) of sample i (all of sample i share one prompt,
    all samples one model).

    Returns the outputs in the same shape, each with ``tokens_forwarded`` set; the prompt
    prefill of a sample is attributed to its first strategy.
    """
    jobs: list[list[_Job]] = []
    try:
        first = contexts[0][0][1] if contexts else None
        spec = row_spec(first.info, first.tokens) if first is not None else None
        prefill = backend.begin([row[0][1].query.prompt_ids for row in contexts], spec)  # type: ignore[arg-type]
        jobs = [[_Job(i, REGISTRY[name].program(c)) for name, c in row] for i, row in enumerate(contexts)]
        flat = [job for row in jobs for job in row]
        for job in flat:
            job.step(None)
        running = set(range(len(jobs)))
        while active := [job for job in flat if job.request is not None]:
            groups = [[((job.sample, p), need) for p, need in job.request] for job in active]  # type: ignore[union-attr]
            got, new = backend.stats(groups)
            for job, n in zip(active, new):
                job.tokens += n
                job.step([got[(job.sample, p)] for p, _ in job.request])  # type: ignore[union-attr]
            for i in [i for i in running if all(job.request is None for job in jobs[i])]:
                running.discard(i)
                backend.release(i)  # bounded memory: a finished sample's stats go
    finally:
        backend.end()
    out = []
    for i, row in enumerate(jobs):
        row[0].tokens += prefill[i]
        for job in row:
            assert job.result is not None
            job.result.tokens_forwarded = job.tokens
        out.append([job.result for job in row])  # type: ignore[misc]
    return out


def merged_needs(requests: Sequence[Sequence[tuple[Node, Need]]]) -> dict[Node, Need]:
    """Each requested node once, with the union of what it was asked for (in request order)."""
    needs: dict[Node, Need] = {}
    for group in requests:
        for node, need in group:
            needs[node] = needs[node] | need if node in needs else need
    return needs


class MemoBackend:
    """Any full-sequence forward as a backend: each distinct node is computed once per batch
    by ``forward(prompt + path)`` and reduced with the fast engine's reducer; counts one token
    per node (what a cache would forward).

    Used with the scripted toy LM in tests, and to check the scheduler apart from the cache.
    """

    def __init__(self, forward: Callable[[Sequence[int]], torch.Tensor]):
        self._forward = forward
        self._prompts: list[tuple[int, ...]] = []
        self._store: dict[Node, tuple[Need, NodeStats]] = {}
        self._seen: set[Node] = set()
        self._spec: RowSpec | None = None
        self.bytes_to_host = 0
        self.rows = 0

    def begin(self, prompts: Sequence[tuple[int, ...]], spec: RowSpec) -> list[int]:
        self._prompts, self._spec = list(prompts), spec
        self._seen = {(i, ()) for i in range(len(prompts))}  # nodes a cache would hold
        return [len(p) for p in prompts]

    def stats(self, requests: Sequence[Sequence[tuple[Node, Need]]]) -> tuple[dict[Node, NodeStats], list[int]]:
        new = []
        for group in requests:
            n = 0
            for (i, path), _ in group:
                for d in range(1, len(path) + 1):  # the node and its ancestors, one token each
                    if (i, path[:d]) not in self._seen:
                        self._seen.add((i, path[:d]))
                        n += 1
            new.append(n)
        todo = []
        for node, need in merged_needs(requests).items():
            have = self._store.get(node)
            if have is None or not have[0].covers(need):
                todo.append((node, need if have is None else have[0] | need))
        if todo:
            rows = torch.stack([self._forward((*self._prompts[i], *path)).float() for (i, path), _ in todo])
            got, nbytes = reduce_rows(rows, [need for _, need in todo], self._spec)  # type: ignore[arg-type]
            self.bytes_to_host += nbytes
            self.rows += len(todo)
            for (node, need), st in zip(todo, got):
                self._store[node] = (need, st)
        return {node: st for node, (_, st) in self._store.items()}, new

    def release(self, sample: int) -> None:
        for key in [k for k in self._store if k[0] == sample]:
            del self._store[key]

    def end(self) -> None:
        self._store, self._seen = {}, set()
