"""Label matching on token ids: what decoding the text would say, looked up in tables.

The strategies ask, for a node and its candidate next tokens, what each child's text says
about the labels (SPEC §2.1):

* `exact`: which labels the child's text *confirms* (a label is a whole word: letters/digits
  with no letter or digit on either side; the text is the generation alone, special tokens
  skipped) and which label is *pending* (the text ends with it: whether it is a word depends on
  the next token).
* `paper`: which labels the whole decoded text (prompt + generation, special tokens kept) ends
  with.

:class:`DecodeMatcher` decodes every child's text, as the reference code does: the oracle.
:class:`TokenMatcher` answers from per-token tables built once per tokenizer and label set
(a word automaton for `exact`, an Aho-Corasick automaton over label prefixes for `paper`),
vectorised over a node's children. A token's text is fixed (how it decodes after other text)
except after a token whose bytes are incomplete UTF-8, or that ends with a space the
tokenizer's clean-up may remove: below such a token the matcher decodes (state ``DECODE``).

A worked example with Llama 3 tokens (``unsafe``, ``\\n``, ``S``, ``1``, ``,S``, ``14``): after
``S``,``1`` the text ends with ``S1`` (pending S1); the child ``,S`` confirms S1 (a comma ends
the word) and leaves ``S`` as the start of a new word; ``14`` then makes ``S14`` pending.
Labels are letters/digits (the taxonomy insists), which is what lets a state be a short string.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tokmarg.probability import label_state

DECODE = -1  # state of a node whose text must be decoded
Decode = Callable[[Sequence[int], bool], str]


@dataclass(frozen=True)
class ExactStep:
    """Children of one node (n of them), `exact` semantics."""

    states: np.ndarray  # (n,) int64 matcher state of each child
    confirmed: np.ndarray  # (n, L) bool: labels the child's text confirms (at least the new ones)
    pending: np.ndarray  # (n,) int64 label index the child's text ends with, or -1


@dataclass(frozen=True)
class PaperStep:
    states: np.ndarray  # (n,) int64
    ends: np.ndarray  # (n, L) bool: labels the whole text ends with after the child


class DecodeMatcher:
    """Decode each child's text and test it (the reference code's way; every state is DECODE)."""

    def __init__(self, labels: Sequence[str], decode: Decode):
        self.labels = tuple(labels)
        self._decode = decode

    def exact_root(self) -> int:
        return DECODE

    def paper_root(self, prompt: Sequence[int]) -> int:
        return DECODE

    def exact_children(self, state: int, path: Sequence[int], ids: np.ndarray) -> ExactStep:
        n, labels = len(ids), self.labels
        conf = np.zeros((n, len(labels)), dtype=bool)
        pend = np.full(n, -1, dtype=np.int64)
        for j, t in enumerate(ids.tolist()):
            confirmed, pending = label_state(self._decode([*path, t], True), labels)
            for k, label in enumerate(labels):
                conf[j, k] = label in confirmed
                if label in pending:
                    pend[j] = k
        return ExactStep(np.full(n, DECODE, dtype=np.int64), conf, pend)

    def paper_children(self, state: int, prompt: Sequence[int], path: Sequence[int], ids: np.ndarray) -> PaperStep:
        ends = np.zeros((len(ids), len(self.labels)), dtype=bool)
        for j, t in enumerate(ids.tolist()):
            text = self._decode([*prompt, *path, t], False)
            ends[j] = [text.endswith(label) for label in self.labels]
        return PaperStep(np.full(len(ids), DECODE, dtype=np.int64), ends)


# ---------------------------------------------------------------- per-token analysis

EMPTY, WORD, MIXED = 0, 1, 2


def _runs(text: str) -> list[tuple[int, int]]:
    """Maximal runs of letters/digits as (start, end)."""
    out, start = [], None
    for i, ch in enumerate(text):
        if ch.isalnum():
            if start is None:
                start = i
        elif start is not None:
            out.append((start, i))
            start = None
    if start is not None:
        out.append((start, len(text)))
    return out


@dataclass(frozen=True)
class _Shape:
    """What each token's text looks like to the word automaton (over the vocabulary)."""

    kind: np.ndarray  # (V,) int8 EMPTY | WORD (all letters/digits) | MIXED
    lead: list[str]  # word run at the start ('' if the text starts with a non-word char)
    tail: list[str]  # word run at the end, after a non-word char ('' if none)
    inner: dict[int, tuple[int, ...]]  # token -> labels that are whole words strictly inside it


def _shape(texts: Sequence[str], label_index: dict[str, int]) -> _Shape:
    kind = np.zeros(len(texts), dtype=np.int8)
    lead, tail = [""] * len(texts), [""] * len(texts)
    inner: dict[int, tuple[int, ...]] = {}
    for t, s in enumerate(texts):
        if not s:
            continue
        runs = _runs(s)
        if runs == [(0, len(s))]:
            kind[t], lead[t] = WORD, s
            continue
        kind[t] = MIXED
        if runs and runs[0][0] == 0:
            lead[t] = s[: runs[0][1]]
            runs = runs[1:]
        if runs and runs[-1][1] == len(s):
            tail[t] = s[runs[-1][0] :]
            runs = runs[:-1]
        found = tuple(label_index[s[a:b]] for a, b in runs if s[a:b] in label_index)
        if found:
            inner[t] = found
    return _Shape(kind, lead, tail, inner)


def _by_string(strings: Sequence[str], mask: np.ndarray) -> dict[str, np.ndarray]:
    """String -> the token ids having it, over the tokens where ``mask``."""
    out: dict[str, list[int]] = {}
    for t in np.flatnonzero(mask).tolist():
        out.setdefault(strings[t], []).append(t)
    return {s: np.array(v, dtype=np.int64) for s, v in out.items()}


class TokenMatcher:
    """Table look-ups equal to :class:`DecodeMatcher` (see the module docstring).

    ``follow[t]``: the text token t adds after other text, special tokens ''; ``first[t]``: its
    text at the start of a generation; ``literal[t]``: its text with special tokens kept (the
    `paper` text); ``unstable[t]``: text after t may not simply append (decode below it).
    """

    START, BOUNDARY, DEAD = 0, 1, 2  # `exact` states; then 3 + i for label prefix i

    def __init__(
        self,
        labels: Sequence[str],
        follow: Sequence[str],
        first: Sequence[str],
        literal: Sequence[str],
        unstable: np.ndarray,
        decode: Decode,
    ):
        self.labels = tuple(labels)
        if not all(label.isalnum() for label in self.labels):
            raise ValueError(f"labels must be letters/digits: {self.labels}")
        self._oracle = DecodeMatcher(labels, decode)
        self._decode = decode
        self._texts = {"follow": follow, "first": first, "literal": literal}
        self.unstable = np.asarray(unstable, dtype=bool)
        self.prefixes = sorted({label[:i] for label in self.labels for i in range(1, len(label) + 1)})
        self._pid = {p: i for i, p in enumerate(self.prefixes)}
        self._lidx = {label: i for i, label in enumerate(self.labels)}
        self._max_len = max(len(label) for label in self.labels)
        self._exact: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # state -> (next, conf) rows
        self._paper: dict[int, np.ndarray] = {}  # state -> next-state row
        self._shapes: dict[str, tuple[_Shape, np.ndarray, np.ndarray, np.ndarray]] = {}
        self._paper_base: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        # (1 + prefixes, L): labels that are suffixes of each Aho-Corasick state's string
        self._ends = np.array([[s.endswith(label) for label in self.labels] for s in ["", *self.prefixes]])
        self._pending = np.array([-1, -1, -1, *(self._lidx.get(p, -1) for p in self.prefixes)], dtype=np.int64)

    def warm(self) -> TokenMatcher:
        """Build the tables every run needs (at model load rather than inside the first batch)."""
        self._exact_row(self.START)
        self._exact_row(self.BOUNDARY)
        self._paper_row(0)
        return self

    # ------------------------------------------------------------ exact: the word automaton

    def _state_of(self, word: str) -> int:
        i = self._pid.get(word)
        return self.DEAD if i is None else 3 + i

    def _shape_of(self, which: str) -> tuple[_Shape, np.ndarray, np.ndarray, np.ndarray]:
        """Token shapes of the ``first`` or ``follow`` texts and, independent of the state: the
        state after a MIXED token (set by its tail), the state a lead starts, the label a lead is."""
        if which not in self._shapes:
            sh = _shape(self._texts[which], self._lidx)
            n = len(sh.kind)
            tail = np.fromiter((self._state_of(w) if w else self.BOUNDARY for w in sh.tail), np.int64, n)
            lead = np.fromiter((self._state_of(w) if w else self.DEAD for w in sh.lead), np.int64, n)
            label = np.fromiter((self._lidx.get(w, -1) for w in sh.lead), np.int64, n)
            self._shapes[which] = (sh, tail, lead, label)
        return self._shapes[which]

    def _exact_row(self, state: int) -> tuple[np.ndarray, np.ndarray]:
        """(next state, label the token confirms by ending the current word or -1) for every
        token from ``state``; built on first use (a handful of states are ever reached)."""
        if state in self._exact:
            return self._exact[state]
        sh, tail_state, lead_state, lead_label = self._shape_of("first" if state == self.START else "follow")
        word, mixed = sh.kind == WORD, sh.kind == MIXED
        nxt = tail_state.copy()
        nxt[sh.kind == EMPTY] = state
        conf = np.full(len(sh.kind), -1, dtype=np.int64)
        if state in (self.START, self.BOUNDARY):  # at a word start: the token's lead is the word
            nxt[word] = lead_state[word]
            conf[mixed] = lead_label[mixed]
        elif state == self.DEAD:
            nxt[word] = self.DEAD
        else:  # inside a word that is a label prefix: only a few leads extend it
            here = self.prefixes[state - 3]
            nxt[word] = self.DEAD
            conf[mixed & np.array([not w for w in sh.lead])] = self._lidx.get(here, -1)
            words, leads = _by_string(sh.lead, word), _by_string(sh.lead, mixed)
            for p in self.prefixes:
                if len(p) > len(here) and p.startswith(here):
                    rest = p[len(here) :]
                    if rest in words:
                        nxt[words[rest]] = self._state_of(p)
                    if p in self._lidx and rest in leads:
                        conf[leads[rest]] = self._lidx[p]
        self._exact[state] = (nxt, conf)
        return nxt, conf

    def exact_root(self) -> int:
        return self.START

    def exact_children(self, state: int, path: Sequence[int], ids: np.ndarray) -> ExactStep:
        if state == DECODE:
            return self._oracle.exact_children(state, path, ids)
        nxt_row, conf_row = self._exact_row(state)
        nxt, first_conf = nxt_row[ids], conf_row[ids]
        conf = np.zeros((len(ids), len(self.labels)), dtype=bool)
        hit = np.flatnonzero(first_conf >= 0)
        conf[hit, first_conf[hit]] = True
        inner = self._shape_of("first" if state == self.START else "follow")[0].inner
        if inner:
            for j, t in enumerate(ids.tolist()):
                for k in inner.get(t, ()):
                    conf[j, k] = True
        return ExactStep(np.where(self.unstable[ids], DECODE, nxt), conf, self._pending[nxt])

    # ------------------------------------------------------------ paper: suffixes of the whole text

    def _ac_state(self, text: str) -> int:
        """Longest suffix of ``text`` that is a label prefix: 0 for none, i + 1 for prefixes[i]."""
        for n in range(min(len(text), self._max_len), 0, -1):
            i = self._pid.get(text[-n:])
            if i is not None:
                return i + 1
        return 0

    def _paper_row(self, state: int) -> np.ndarray:
        """The Aho-Corasick state after every token, from ``state``. A label prefix cannot span a
        non-letter/digit, so after a token it is the longest label-prefix suffix of the token's
        own text, unless the token is itself a piece of a label (then it may extend the state's
        string) or has no text (the state stays)."""
        if state in self._paper:
            return self._paper[state]
        literal = self._texts["literal"]
        if self._paper_base is None:  # the part that does not depend on the state, once
            base = np.fromiter((self._ac_state(s) for s in literal), np.int64, len(literal))
            pieces = {
                label[i:j] for label in self.labels for i in range(len(label)) for j in range(i + 1, len(label) + 1)
            }
            infix = np.flatnonzero([s in pieces for s in literal])
            empty = np.flatnonzero([not s for s in literal])
            self._paper_base = (base, infix, empty)
        base, infix, empty = self._paper_base
        row = base.copy()
        row[empty] = state
        here = self.prefixes[state - 1] if state else ""
        for t in infix.tolist():
            row[t] = self._ac_state(here + literal[t])
        self._paper[state] = row
        return row

    def paper_root(self, prompt: Sequence[int]) -> int:
        if prompt and self.unstable[prompt[-1]]:
            return DECODE
        return self._ac_state(self._decode(prompt, False)[-self._max_len :])

    def paper_children(self, state: int, prompt: Sequence[int], path: Sequence[int], ids: np.ndarray) -> PaperStep:
        if state == DECODE:
            return self._oracle.paper_children(state, prompt, path, ids)
        nxt = self._paper_row(state)[ids]
        return PaperStep(np.where(self.unstable[ids], DECODE, nxt), self._ends[nxt])
