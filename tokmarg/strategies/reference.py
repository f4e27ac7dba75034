"""The reference engine: every request is answered by a full forward of prompt + path.

Obviously right and slow: nothing is cached across calls except identical requests within
one sample (see :class:`CountingLM`), which changes no result. The fast engine is tested
against it.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


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


def drive(
    program: Generator[list, list, T], lm: Callable[[Sequence[int]], torch.Tensor], prompt: Sequence[int], spec
) -> T:
    """Run a program to completion, answering each request ``(path, need)`` with the full row
    ``lm(prompt + path)`` reduced on the host (:func:`~tokmarg.nodestats.reference_stats`)."""
    from tokmarg.nodestats import reference_stats

    try:
        request = next(program)
        while True:
            request = program.send([reference_stats(lm((*prompt, *path)), need, spec) for path, need in request])
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
