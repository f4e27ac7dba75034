"""Records at the engine boundary and the strategy registry.

An engine turns one :class:`Query` into one :class:`SampleOutput` per strategy. The
model layer is seen only through :class:`TokenLM` (token ids -> next-token logits) and
:class:`TokenInfo` (what each token id looks like as text).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from tokmarg.choices import Semantics
from tokmarg.matching import DecodeMatcher, TokenMatcher

Matcher = DecodeMatcher | TokenMatcher


class TokenLM(Protocol):
    def __call__(self, ids: Sequence[int]) -> torch.Tensor:
        """Raw next-token logits after ``ids``: (vocab,) float32."""


@dataclass(frozen=True)
class TokenInfo:
    """Tokenizer facts the strategies need, precomputed once per model.

    ``token_texts[i]``: the text token ``i`` adds when it follows other text ('' for special
    tokens); ``standalone[i]``: ``decode([i])`` (the paper's nucleus keys); ``literal[i]``: the
    text it adds with special tokens kept (the `paper` text); ``boundary`` (vocab,) bool: the
    token does not continue a word; ``unstable`` (vocab,) bool: text after the token may not
    simply append (incomplete UTF-8 bytes, a space the tokenizer's clean-up may remove);
    ``decode(ids, skip_special)``.
    """

    token_texts: tuple[str, ...]
    standalone: tuple[str, ...]
    eos_ids: frozenset[int]
    boundary: torch.Tensor
    decode: Callable[[Sequence[int], bool], str]
    literal: tuple[str, ...] | None = None  # None: the same as token_texts
    unstable: np.ndarray | None = None  # None: no token is unstable
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def matcher(self, labels: Sequence[str]) -> TokenMatcher:
        """The table matcher for these labels (built once per label set)."""
        key = ("matcher", tuple(labels))
        if key not in self._cache:
            n = len(self.token_texts)
            special = [not t and bool(s) for t, s in zip(self.token_texts, self.standalone)]
            first = tuple("" if sp else s for s, sp in zip(self.standalone, special))
            literal = self.literal or tuple(
                s if sp else t for t, s, sp in zip(self.token_texts, self.standalone, special)
            )
            unstable = np.zeros(n, dtype=bool) if self.unstable is None else self.unstable
            self._cache[key] = TokenMatcher(labels, self.token_texts, first, literal, unstable, self.decode)
        return self._cache[key]

    @property
    def boundary_np(self) -> np.ndarray:
        if "boundary" not in self._cache:
            self._cache["boundary"] = self.boundary.numpy().astype(bool)
        return self._cache["boundary"]

    @property
    def collapse_group(self) -> np.ndarray:
        """(vocab,) int64: the lowest id with the same ``standalone`` string (the paper's nucleus
        collapses tokens that decode alike), and whether any token shares its string."""
        if "group" not in self._cache:
            first: dict[str, int] = {}
            group = np.array([first.setdefault(s, i) for i, s in enumerate(self.standalone)], dtype=np.int64)
            shared = np.bincount(group, minlength=len(group))[group] > 1
            self._cache["group"] = (group, shared)
        return self._cache["group"]


@dataclass(frozen=True)
class ModelTokens:
    """Per-model token facts about the labels.

    ``forced_prefix``: token ids of the forced prefix (``unsafe\\nS``) appended to a prompt;
    ``code_rest[code]``: (exact) the ids of the code after the forced prefix, e.g. for
    SmolLM2 ``S14`` -> ``('1', '4')`` ids; ``code_paper_id[code]``: (paper)
    ``encode(code)[1]``; ``verdict_ids``: (exact) full ids of ``safe`` / ``unsafe``;
    ``verdict_first``: (paper) ``encode(word)[0]`` of each.
    """

    forced_prefix: tuple[int, ...]
    code_rest: dict[str, tuple[int, ...]]
    code_paper_id: dict[str, int]
    verdict_ids: dict[str, tuple[int, ...]]
    verdict_first: dict[str, int]


@dataclass(frozen=True)
class StrategyParams:
    top_p: float = 0.99
    max_new_tokens: int = 50
    eps: float = 0.01
    threshold: float = 0.2


@dataclass(frozen=True)
class Query:
    """One sample as one model sees it."""

    sample_id: str
    prompt_ids: tuple[int, ...]  # generation prompt, as the chat template wrote it
    labels: tuple[str, ...]  # "unsafe" + taxonomy codes
    decide_safe: bool  # the dataset has safe rows: forced-prefix strategies decide safe/unsafe first

    @property
    def codes(self) -> tuple[str, ...]:
        return self.labels[1:]


@dataclass
class SampleOutput:
    """What one strategy says about one sample (the engine boundary record)."""

    scores: dict[str, float] | None = None  # label -> score; None: strategy gives no scores
    pred_labels: tuple[str, ...] = ()  # predicted codes (filled by finalize for uncertainty)
    unexplored_mass: float | None = None
    unexplored_by_label: dict[str, float] | None = None
    greedy_text: str | None = None
    tokens_forwarded: int = 0
    uncertainty: float | None = None  # u of the uncertainty strategies
    ranked: tuple[str, ...] | None = None  # codes by evidence, best first
    gate_unsafe: bool | None = None  # verdict of the safe/unsafe gate (None: no gate)
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Kind:
    """What a kind of strategy predicts and how its predictions are scored (SPEC §2-3).

    ``thresholded``: its codes are its scores at or above the strategy's threshold (else it
    names its codes); ``fitted``: it names them only after a dataset-level step
    (:func:`tokmarg.strategies.uncertainty.fit_predictions`); ``unsafe_from_output``: in the
    binary safe/unsafe view, an output that says unsafe counts even without a known code.
    """

    name: str
    summary: str
    thresholded: bool = False
    fitted: bool = False
    unsafe_from_output: bool = False

    def __str__(self) -> str:
        return self.name

    def codes(self, scores: np.ndarray | None, named: np.ndarray, threshold: float) -> np.ndarray:
        """(n, k) bool predicted codes from (n, k) code scores or the (n, k) named codes."""
        if not self.thresholded:
            return named
        return scores >= threshold if scores is not None else np.zeros_like(named)

    def unsafe(
        self, unsafe_score: np.ndarray | None, codes: np.ndarray, in_output: np.ndarray, threshold: float
    ) -> np.ndarray:
        """(n,) bool: predicted unsafe, for the binary view."""
        if self.thresholded and unsafe_score is not None:
            return unsafe_score >= threshold
        named = codes.any(axis=1)
        return (in_output.astype(bool) | named) if self.unsafe_from_output else named

    def sample_codes(self, out: SampleOutput, threshold: float, codes: Sequence[str]) -> tuple[str, ...]:
        """One sample's predicted codes (after the dataset-level step for a fitted kind)."""
        if self.thresholded:
            return tuple(c for c in codes if (out.scores or {}).get(c, 0.0) >= threshold)
        return out.pred_labels


SCORES = Kind("scores", "per-label scores, thresholded into codes", thresholded=True)
CODES = Kind("codes", "codes named in the output, no scores", unsafe_from_output=True)
UNCERTAINTY = Kind("uncertainty", "top-1 or top-2 codes by a dataset-level uncertainty threshold", fitted=True)
KINDS = {k.name: k for k in (SCORES, CODES, UNCERTAINTY)}


@dataclass(frozen=True)
class Strategy:
    """A strategy: ``program(ctx)`` yields logits requests and returns a :class:`SampleOutput`;
    its :class:`Kind` says what it predicts and how that is scored."""

    name: str
    kind: Kind
    program: Callable[[Context], Generator[list, list, SampleOutput]]
    doc: str

    def run(self, ctx: Context) -> SampleOutput:
        """One sample on the reference engine: a full forward of ``ctx.lm`` per request, the
        full row reduced on the host, labels matched by decoding."""
        from dataclasses import replace

        from tokmarg.matching import DecodeMatcher
        from tokmarg.strategies.programs import row_spec
        from tokmarg.strategies.reference import drive

        if ctx.lm is None:
            raise ValueError("Strategy.run needs ctx.lm (a full-sequence forward)")
        ctx = replace(ctx, matcher=DecodeMatcher(ctx.query.labels, ctx.info.decode))
        return drive(self.program(ctx), ctx.lm, ctx.query.prompt_ids, row_spec(ctx.info, ctx.tokens))


@dataclass
class Context:
    lm: TokenLM | None  # only the reference engine's ``Strategy.run`` uses it
    info: TokenInfo
    tokens: ModelTokens
    query: Query
    params: StrategyParams
    semantics: Semantics
    matcher: Matcher | None = None  # None: the token-id tables of ``info`` (the fast engines)

    def label_matcher(self) -> Matcher:
        return self.matcher if self.matcher is not None else self.info.matcher(self.query.labels)


REGISTRY: dict[str, Strategy] = {}
ProgramFn = Callable[[Context], Generator[list, list, SampleOutput]]


def register(name: str, kind: Kind) -> Callable[[ProgramFn], ProgramFn]:
    def deco(fn: ProgramFn) -> ProgramFn:
        if name in REGISTRY:
            raise ValueError(f"strategy {name!r} registered twice")
        REGISTRY[name] = Strategy(name, kind, fn, (fn.__doc__ or "").strip())
        return fn

    return deco
