"""Pure probability arithmetic: no model, tokenizer or file in here.

Everything takes tensors/arrays/strings and returns them, so each rule of SPEC §2 can be
tested on hand-built distributions (the nucleus rules and node summaries live in
:mod:`tokmarg.nodestats`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# ---------------------------------------------------------------- label matching (`exact`)


def _is_word_char(ch: str) -> bool:
    return ch.isalnum()


def occurrences(text: str, label: str) -> list[tuple[int, int, bool]]:
    """Occurrences of ``label`` in ``text`` with a boundary on the left.

    Returns ``[(start, end, confirmed), ...]``: ``confirmed`` is True when the character
    after ``end`` is known and not a letter/digit; an occurrence ending exactly at the end
    of ``text`` is returned with ``confirmed=False`` (whether it ends there depends on what
    comes next).  Occurrences followed by a letter/digit are not returned.

    Example: ``occurrences("S1,S14", "S1") == [(0, 2, True)]`` (the ``S1`` inside ``S14``
    continues with the digit ``4``); ``occurrences("S1,S14", "S14") == [(3, 6, False)]``.
    """
    out: list[tuple[int, int, bool]] = []
    start = text.find(label)
    while start != -1:
        end = start + len(label)
        left_ok = start == 0 or not _is_word_char(text[start - 1])
        if left_ok:
            if end == len(text):
                out.append((start, end, False))
            elif not _is_word_char(text[end]):
                out.append((start, end, True))
        start = text.find(label, start + 1)
    return out


def label_state(text: str, labels: Sequence[str]) -> tuple[frozenset[str], frozenset[str]]:
    """(labels with a confirmed occurrence, labels whose occurrence ends at the end of text)."""
    confirmed, pending = set(), set()
    for label in labels:
        for _, _, ok in occurrences(text, label):
            (confirmed if ok else pending).add(label)
    return frozenset(confirmed), frozenset(pending - confirmed)


def first_occurrence(text: str, label: str) -> tuple[int, int] | None:
    """First occurrence where the end of text counts as a boundary (a finished output)."""
    occ = occurrences(text, label)
    return (occ[0][0], occ[0][1]) if occ else None


def char_to_token(prefix_lengths: Sequence[int], char_pos: int) -> int:
    """Index of the token that holds character ``char_pos``.

    ``prefix_lengths[i]`` is ``len(decode(tokens[: i + 1]))``.
    """
    for i, n in enumerate(prefix_lengths):
        if n > char_pos:
            return i
    raise ValueError(f"character {char_pos} is past the decoded text")


def boundary_mask(token_texts: Sequence[str], special: Sequence[bool]) -> torch.Tensor:
    """(vocab,) bool: True where a next token does not continue a word.

    A special token (EOS, ...), a token that decodes to nothing, or one whose first
    character is not a letter/digit ends the word before it.
    """
    return torch.tensor(
        [sp or not t or not _is_word_char(t[0]) for t, sp in zip(token_texts, special)], dtype=torch.bool
    )


# ---------------------------------------------------------------- uncertainty (SPEC §2)


def code_softmax(evidence: np.ndarray) -> np.ndarray:
    """Softmax over the per-code evidence vector (float64); uniform if no code is possible
    (every evidence -inf, e.g. no boundary can follow any code)."""
    e = np.asarray(evidence, dtype=np.float64)
    if not np.isfinite(e.max()):
        return np.full(e.shape, 1.0 / e.size)
    z = np.exp(e - e.max())
    return z / z.sum()


def probability_uncertainty(evidence: np.ndarray) -> float:
    """u = 1 / (1 + max softmax probability)."""
    return float(1.0 / (1.0 + code_softmax(evidence).max()))


def entropy_uncertainty(evidence: np.ndarray) -> float:
    """u = entropy of the softmax over codes (the reference adds 1e-10 inside the log)."""
    p = code_softmax(evidence)
    return float(-(p * np.log(p + 1e-10)).sum())


def _digamma(x: np.ndarray) -> np.ndarray:
    try:
        from scipy.special import digamma
    except ImportError:  # where scipy is not installed (the GPU check's machine): torch's digamma
        return torch.special.digamma(torch.from_numpy(x)).numpy()
    return digamma(x)


def logtoku_uncertainty(evidence: np.ndarray, k: int = 2) -> float:
    """LogTokU with the top-k evidence values a as Dirichlet evidence.

    u = EU / AU with EU = k / (sum(max(0, a)) + k) and
    AU = -sum_j (a_j / a_0) (psi(a_j + 1) - psi(a_0 + 1)), a_0 = sum_j a_j.
    Raw logits are the evidence (not shift-invariant), as in the paper.
    """
    a = np.sort(np.asarray(evidence, dtype=np.float64))[-k:]
    a0 = a.sum()
    au = float(-np.sum((a / a0) * (_digamma(a + 1.0) - _digamma(np.array([a0 + 1.0])))))
    eu = k / (np.maximum(a, 0.0).sum() + k)
    return float(eu / au)


def rank_codes(codes: Sequence[str], evidence: np.ndarray) -> list[str]:
    """Codes by descending evidence; ties go to the code first in string order
    (``S1`` < ``S10`` < ... < ``S2``), as the reference's lexicographic label order does."""
    order = sorted(range(len(codes)), key=lambda i: codes[i])
    order.sort(key=lambda i: -float(evidence[i]))  # stable: ties keep string order
    return [codes[i] for i in order]
