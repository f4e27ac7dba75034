"""Engines answer the strategies' logits requests (see :mod:`tokmarg.strategies.programs`).

``reference``: one full forward of prompt + path per request (obviously right, slow).
``fast``: the shared prompt prefix prefilled once per model; per sample one prefill of the
rest of the prompt; every distinct continuation node forwarded once, the nodes of many
samples and strategies together, with tree attention over one packed KV cache.
"""

from tokmarg.choices import Engine
from tokmarg.errors import TokmargError

__all__ = ["DEFAULT_LOOKAHEAD", "Engine", "EngineError"]
DEFAULT_LOOKAHEAD = 16  # greedy tokens the fast engine guesses ahead at most (see engine.lookahead)


class EngineError(TokmargError, ValueError):
    """The chosen engine cannot run this model or these options; one line."""
