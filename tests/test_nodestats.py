"""The device reduction (`reduce_rows`) against the one-row oracle (`reference_stats`).

Rows are made to hit each path of the reduction: a peaked guard-like row (its nucleus inside the
first top k), a flat row (the nucleus runs past k = 32 and 1024), ties reaching the k-th token
(the tie check must send the row on), EOS inside a nucleus (`exact` keeps 3 tokens), a greedy-only
row, and a vocabulary large enough for the blocked top k (Llama 3's 128,256) and one too small.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokmarg.nodestats import EXACT, PAPER, Need, RowSpec, reduce_rows, reference_stats

EOS = (7, 11)


def _rows(vocab: int, gen: torch.Generator) -> torch.Tensor:
    peaked = torch.randn(vocab, generator=gen) * 4.0
    peaked[123] = 30.0
    peaked[vocab - 1] = 28.5  # in the short last block when vocab % 128 != 0
    # flat: the 0.99 nucleus is tens of thousands of tokens (for 128k), neighbours apart by a
    # relative 1e-4, well above float32 rounding, so the sorted order is unambiguous
    flat = torch.randperm(vocab, generator=gen).float() * (12.8 / vocab)
    ties = torch.randn(vocab, generator=gen) - 10.0
    firsts = torch.tensor([vocab // 2 + 3, 5, 200])
    ties[firsts] = 12.0  # three tied first, in three blocks
    tied = torch.randperm(vocab, generator=gen)[:50]
    ties[tied[~torch.isin(tied, firsts)][:40]] = 9.0  # 40 tokens tied second, across blocks
    eos_row = torch.randn(vocab, generator=gen) * 4.0
    eos_row[EOS[1]] = 30.0
    eos_row[300] = 30.0  # tied with EOS: the lower id (EOS, 11) comes first
    eos_row[301] = 29.5
    eos_row[302] = 29.0
    clamped = torch.full((vocab,), -200.0)  # most tokens below the exp floor
    clamped[42] = 0.0
    clamped[43] = -0.5
    return torch.stack([peaked, flat, ties, eos_row, clamped])


NEEDS = [
    Need(nuclei=((EXACT, 0.9), (PAPER, 0.9))),
    Need(nuclei=((EXACT, 0.99),), boundary=True),
    Need(top1=True, nuclei=((PAPER, 0.999), (EXACT, 0.5))),
    Need(nuclei=((EXACT, 0.99), (PAPER, 0.99)), watch=True),
    Need(top1=True),  # a greedy step
]


@pytest.mark.parametrize("vocab", [128_256, 128_300, 1_000])
def test_reduce_rows_equals_the_oracle(vocab: int) -> None:
    gen = torch.Generator().manual_seed(vocab)
    logits = _rows(vocab, gen)
    boundary = torch.rand(vocab, generator=gen) < 0.3
    spec = RowSpec(boundary=boundary, eos_ids=EOS, watch_ids=(3, 123, 300))
    # every need on every row, so each row goes through each path
    needs = [need for need in NEEDS for _ in range(len(logits))]
    rows = logits.repeat(len(NEEDS), 1)
    got, nbytes = reduce_rows(rows, needs, spec)
    if vocab > 100_000:  # the peaked rows alone: a few hundred bytes, not 4 x vocab each
        peaked = [r for r in range(len(rows)) if r % len(logits) == 0]
        assert reduce_rows(rows[peaked], [needs[r] for r in peaked], spec)[1] < 2_000
    for r, (row, need) in enumerate(zip(rows, needs)):
        want = reference_stats(row, need, spec)
        have = got[r]
        assert have.nucleus.keys() == want.nucleus.keys()
        for key, (n, eos_in) in want.nucleus.items():
            # `paper` sums a nucleus in float32 (SPEC 2.1): over tens of thousands of tokens the
            # sum's last bits follow each probability's, so the cut may move by one token there
            slack = 1 if key[0] == PAPER and n > 10_000 else 0
            assert abs(have.nucleus[key][0] - n) <= slack and have.nucleus[key][1] == eos_in, (r, key)
        k = min(len(have.top_ids), len(want.top_ids))
        assert abs(len(have.top_ids) - len(want.top_ids)) <= (0 if k < 10_000 else 1), r
        np.testing.assert_allclose(have.top_probs[:k], want.top_probs[:k], rtol=2e-6, atol=1e-9)
        if k < 1_000:
            np.testing.assert_array_equal(have.top_ids, want.top_ids, err_msg=str(r))
        else:  # a wide nucleus of a random row: neighbours within rounding may swap places
            probs = torch.softmax(row.double(), dim=-1).float().numpy()
            np.testing.assert_allclose(probs[have.top_ids], have.top_probs, rtol=2e-6, atol=1e-12)
            assert len(set(have.top_ids.tolist())) == len(have.top_ids)
        assert have.lse == pytest.approx(want.lse, rel=1e-6)
        np.testing.assert_allclose(have.eos_probs, want.eos_probs, rtol=2e-6, atol=1e-12)
        if need.boundary:
            assert have.boundary_mass == pytest.approx(want.boundary_mass, rel=2e-6)
        assert have.watch == want.watch


def test_flat_and_tied_rows_escalate_past_the_first_k() -> None:
    """The cases above that must leave the first top k do: the flat row's 0.99 nucleus is
    thousands of tokens, and the tied row's 3 first and 40 second-place tokens all come, lower ids first."""
    vocab = 128_256
    logits = _rows(vocab, torch.Generator().manual_seed(1))
    spec = RowSpec(boundary=torch.zeros(vocab, dtype=torch.bool), eos_ids=EOS, watch_ids=())
    flat, tied = reduce_rows(logits[1:3], [Need(nuclei=((EXACT, 0.999),))] * 2, spec)[0]
    assert flat.nucleus[(EXACT, 0.999)][0] > 8192
    n, _ = tied.nucleus[(EXACT, 0.999)]
    assert n == 43  # 3 x e^12 + 40 x e^9 hold all but 1e-5 of the mass; 42 tokens hold < 0.999
    assert list(tied.top_ids[:3]) == [5, 200, vocab // 2 + 3]
    second = tied.top_ids[3:43]
    assert list(second) == sorted(second)
