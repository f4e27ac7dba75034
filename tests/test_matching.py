"""The token-id label matcher says what decoding says, in both semantics (a property test).

For each tokenizer (the test tier's, Meta's Llama 3, SmolLM2's in the slow tier), 10,000+
continuations, random and real, are walked token by token with both matchers, tracking what
the `exact` tree tracks (labels seen on the path, the pending label) and what the `paper`
walk tests (the labels the whole text ends with). Any difference fails.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from tokmarg.matching import DecodeMatcher
from tokmarg.models import model_view, token_info
from tokmarg.prompts import prompt_ids
from tokmarg.taxonomy import LLAMA_GUARD_3

LABELS = LLAMA_GUARD_3.labels
N_SEQUENCES = 10_000


def walk_exact(matcher, info, seq: list[int]) -> list[tuple[tuple[int, ...], int]]:
    """Per step: (labels newly counted, label pending), as the exact tree updates them."""
    state, seen, pending, out = matcher.exact_root(), np.zeros(len(LABELS), dtype=bool), -1, []
    for i, t in enumerate(seq):
        step = matcher.exact_children(state, seq[:i], np.array([t]))
        seen2 = seen.copy()
        if pending >= 0 and info.boundary_np[t]:
            seen2[pending] = True
        new = step.confirmed[0] & ~seen2
        seen = seen2 | new
        p = int(step.pending[0])
        pending = -1 if p >= 0 and seen[p] else p
        state = int(step.states[0])
        out.append((tuple(np.flatnonzero(new).tolist()), pending))
    return out


def walk_paper(matcher, prompt: tuple[int, ...], seq: list[int]) -> list[tuple[int, ...]]:
    """Per step: the labels the whole text ends with."""
    state, out = matcher.paper_root(prompt), []
    for i, t in enumerate(seq):
        step = matcher.paper_children(state, prompt, seq[:i], np.array([t]))
        state = int(step.states[0])
        out.append(tuple(np.flatnonzero(step.ends[0]).tolist()))
    return out


def _real_texts(rng: random.Random) -> list[str]:
    """Answers a classifier gives, well- and ill-formed."""
    codes = list(LLAMA_GUARD_3.codes)
    seps = [",", ", ", " ", "\n", ";", " ,", ",,", "/", ", and "]
    out = []
    for _ in range(200):
        picked = rng.sample(codes, rng.randint(1, 4))
        head = rng.choice(["unsafe\n", "unsafe", "unsafe ", "Unsafe\n", "safe", "safe\n", "\n\nunsafe\n", "uns", ""])
        tail = rng.choice(["", "\n", ".", " n't", "x", "4", "é", " 🙂", "<|eot_id|>", "<|im_end|>", "S", "1"])
        out.append(head + rng.choice(seps).join(picked) + tail)
    return out


def _sequences(tok, vocab: int, rng: random.Random) -> list[list[int]]:
    """Real continuations (answers tokenized, then mutated with label-relevant tokens) and
    random token sequences over the whole vocabulary."""
    real = [tok.encode(t, add_special_tokens=False) for t in _real_texts(rng)]
    pool = sorted({t for s in real for t in s} | set(getattr(tok, "all_special_ids", [])))
    seqs: list[list[int]] = []
    while len(seqs) < N_SEQUENCES // 2:
        s = list(rng.choice(real))
        for _ in range(rng.randint(0, 3)):  # mutate: insert a label-relevant token
            s.insert(rng.randint(0, len(s)), rng.choice(pool))
        seqs.append(s[: rng.randint(1, max(1, len(s)))] if rng.random() < 0.3 else s)
    while len(seqs) < N_SEQUENCES:
        seqs.append([rng.randrange(vocab) for _ in range(rng.randint(1, 8))])
    return seqs


def check_tokenizer(tok, vocab: int, prompts: list[tuple[int, ...]], seed: int = 0) -> dict[str, int]:
    eos = frozenset({tok.eos_token_id})
    info = token_info(tok, eos, vocab)
    table, oracle = info.matcher(LABELS), DecodeMatcher(LABELS, info.decode)
    rng = random.Random(seed)
    counts = {"sequences": 0, "steps": 0, "decoded_steps": 0, "exact_events": 0, "paper_events": 0}
    for seq in _sequences(tok, vocab, rng):
        prompt = rng.choice(prompts)
        got, want = walk_exact(table, info, seq), walk_exact(oracle, info, seq)
        assert got == want, (seq, tok.decode(seq), got, want)
        got_p, want_p = walk_paper(table, prompt, seq), walk_paper(oracle, prompt, seq)
        assert got_p == want_p, (seq, tok.decode([*prompt, *seq]), got_p, want_p)
        counts["sequences"] += 1
        counts["steps"] += len(seq)
        counts["exact_events"] += sum(bool(n) or p >= 0 for n, p in want)
        counts["paper_events"] += sum(bool(e) for e in want_p)
        unstable = [i for i, t in enumerate(seq) if info.unstable[t]]
        counts["decoded_steps"] += len(seq) - (unstable[0] + 1) if unstable else 0
    # the property is not vacuous: labels were found, and most steps used the tables
    assert counts["exact_events"] > 2000 and counts["paper_events"] > 2000, counts
    assert counts["decoded_steps"] < counts["steps"] / 2, counts
    return counts


def _prompts(tok) -> list[tuple[int, ...]]:
    msgs = [{"role": "user", "content": "Is this safe? S1"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return [prompt_ids(tok, text + extra) for extra in ("", "\n\n", "unsafe\nS", "S1")]


def test_matcher_on_test_tier_tokenizer(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    counts = check_tokenizer(tok, len(tok), _prompts(tok))
    assert counts["sequences"] >= N_SEQUENCES


def test_matcher_on_llama3_tokenizer(llama3_tokenizer) -> None:
    counts = check_tokenizer(llama3_tokenizer, len(llama3_tokenizer), _prompts(llama3_tokenizer), seed=1)
    assert counts["sequences"] >= N_SEQUENCES


@pytest.mark.slow
def test_matcher_on_smollm2_tokenizer() -> None:
    from transformers import AutoTokenizer

    from tokmarg.models import converted_dir

    tok = AutoTokenizer.from_pretrained(converted_dir("smollm2-135m-instruct"))
    counts = check_tokenizer(tok, len(tok), _prompts(tok), seed=2)
    assert counts["sequences"] >= N_SEQUENCES


def test_llama3_facts(llama3_tokenizer) -> None:
    """The Llama 3 tokenization facts the fixture relies on (issue 11)."""
    tok = llama3_tokenizer

    def pieces(text: str) -> list[str]:
        return [tok.decode([i]) for i in tok.encode(text, add_special_tokens=False)]

    assert len(tok) == 128256 and tok.convert_tokens_to_ids("<|eot_id|>") == 128009
    assert pieces("unsafe") == ["unsafe"]
    assert pieces("unsafe\nS1,S14") == ["unsafe", "\n", "S", "1", ",S", "14"]
    assert pieces("S10, S2") == ["S", "10", ",", " S", "2"]
    assert pieces("\n\nunsafe\nS") == ["\n\n", "unsafe", "\n", "S"]


def test_label_inside_token_through_comma_s(llama3_tokenizer) -> None:
    """``S1,S14`` on Llama 3 is ``S``,``1``,``,S``,``14``: ``,S`` ends the word S1 (confirms it)
    and starts a new word, which ``14`` makes S14 (pending until a boundary follows)."""
    tok = llama3_tokenizer
    info = token_info(tok, frozenset({tok.eos_token_id}), len(tok))
    m = info.matcher(LABELS)
    seq = tok.encode("S1,S14", add_special_tokens=False)
    s1, s14 = LABELS.index("S1"), LABELS.index("S14")
    state, pend, conf = m.exact_root(), [], []
    for i, t in enumerate(seq):
        step = m.exact_children(state, seq[:i], np.array([t]))
        state = int(step.states[0])
        pend.append(int(step.pending[0]))
        conf.append(tuple(np.flatnonzero(step.confirmed[0]).tolist()))
    assert pend == [-1, s1, -1, s14]
    assert conf == [(), (), (s1,), ()]
    assert walk_exact(m, info, seq)[-1] == ((), s14)  # S1 counted through the boundary after it


def test_model_view_builds_the_table_matcher(tiny_model_dir: Path) -> None:
    from tokmarg.models import load_model

    lm = load_model(str(tiny_model_dir), "cpu", "fp32")
    info, _ = model_view(lm, LLAMA_GUARD_3.codes)
    assert info.matcher(LABELS) is info.matcher(LABELS)  # built once per label set
