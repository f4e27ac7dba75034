"""Hand-worked tests of the seven strategies (SPEC §2, §2.1, §2.2) on a scripted toy LM.

Every expected number is worked by hand in the comments (plain arithmetic; scipy's digamma
only as an oracle for one LogTokU value). The toy model (tests/toy.py) splits digits like
SmolLM2 (``S14`` = ``S``,``1``,``4``) and also has whole-label tokens (``unsafe``, ``S1``,
``S2``, ``S4``) for the Llama-3-like case. The prompt is ``x\\n``; EOS is special.
Probabilities are computed in float32 from log-probabilities, hence ``approx(abs=1e-6)``.
"""

from __future__ import annotations

import math

import pytest
from scipy.special import digamma
from toy import EOS, PREFIX, Raw, run

from tokmarg.strategies import SampleOutput
from tokmarg.strategies.uncertainty import finalize

A = 1e-6
ANY = "marginal_probability_at_any_place"
FIXED = "marginal_probability_at_fixed_place"
TOKP = "token_probability"
GREEDY = "greedy_generation"
FORCED = ("probability_uncertainty", "entropy_uncertainty", "LogTokU")


def approx(x: object) -> object:
    return pytest.approx(x, abs=A)


def nonzero(scores: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in scores.items() if abs(v) > A}


def assert_bounded(out: SampleOutput) -> None:
    """`exact` tree: every score is a probability and score + unexplored_by_label <= 1."""
    assert out.scores is not None and out.unexplored_by_label is not None and out.unexplored_mass is not None
    assert -A <= out.unexplored_mass <= 1 + A
    for label, s in out.scores.items():
        assert -A <= s <= 1 + A
        assert s + out.unexplored_by_label[label] <= 1 + A, label


# ---------------------------------------------------------------- SPEC §2.2 worked example

SPEC22 = {
    (): {"S": 1.0},
    ("S",): {"1": 1.0},
    ("S", "1"): {"4": 0.6, ",": 0.3, EOS: 0.1},
    ("S", "1", "4"): {EOS: 1.0},
    ("S", "1", ","): {EOS: 1.0},
}
L22 = ("unsafe", "S1", "S4", "S14")


def test_spec22_paper() -> None:
    # Child `1` of node `S` (c = 1) makes the text end with S1: S1 += 1 x 1.0.
    # Node `S1`: nucleus [4 .6, `,` .3, EOS .1] (cum .6 .9 1.0 > .99 at index 2); EOS in it.
    # Child `4` ends the text with S14 (not S4: "...S14" does not end with "S4"): S14 += .6.
    # `unsafe` never occurs.
    out = run(ANY, SPEC22, "paper", L22)
    assert out.scores == approx({"unsafe": 0.0, "S1": 1.0, "S4": 0.0, "S14": 0.6})


def test_spec22_exact() -> None:
    # S1 occurs only if the token after `S`,`1` is a boundary: 1.0 x (.3 + .1) = .4.
    # S14 = .6 x P(boundary after 14) = .6 x 1.0 = .6. Every nucleus covers all mass: unexplored 0.
    out = run(ANY, SPEC22, "exact", L22)
    assert out.scores == approx({"unsafe": 0.0, "S1": 0.4, "S4": 0.0, "S14": 0.6})
    assert out.unexplored_mass == approx(0.0)
    assert out.unexplored_by_label == approx(dict.fromkeys(L22, 0.0))
    assert_bounded(out)


# ---------------------------------------------------------------- greedy: digit split, two-token label

# Greedy path: uns .8, afe .9, \n .95, S .9, 1 .8, 4 .7, then EOS (1.0) -> "unsafe\nS14".
SPLIT = {
    (): {"uns": 0.8, "safe": 0.2},
    ("uns",): {"afe": 0.9, "x": 0.1},
    ("uns", "afe"): {"\n": 0.95, EOS: 0.05},
    ("uns", "afe", "\n"): {"S": 0.9, EOS: 0.1},
    ("uns", "afe", "\n", "S"): {"1": 0.8, "2": 0.2},
    ("uns", "afe", "\n", "S", "1"): {"4": 0.7, EOS: 0.3},
    ("uns", "afe", "\n", "S", "1", "4"): {EOS: 1.0},
}
LSPLIT = ("unsafe", "S1", "S4", "S14")


@pytest.mark.parametrize(
    ("strategy", "semantics", "expected"),
    [
        # paper: text ends with S1 after `1` (p .8) and with S14 after `4` (p .7).
        (TOKP, "paper", {"S1": 0.8, "S14": 0.7}),
        # paper fixed: running product over matched steps only: afe .9 (unsafe), then
        # x .8 = .72 (S1), then x .7 = .504 (S14). \n and S are not in it.
        (FIXED, "paper", {"S1": 0.72, "S14": 0.504}),
        # exact: S1 is followed by the digit 4, so it does not occur. S14 spans S,1,4:
        # .9 x .8 x .7 = .504.
        (TOKP, "exact", {"S14": 0.504}),
        # exact fixed: whole greedy prefix .8 x .9 x .95 x .9 x .8 x .7 = .344736.
        (FIXED, "exact", {"S14": 0.344736}),
    ],
)
def test_digit_split_codes_on_greedy_path(strategy: str, semantics: str, expected: dict[str, float]) -> None:
    out = run(strategy, SPLIT, semantics, LSPLIT)
    assert out.greedy_text == "unsafe\nS14"
    codes = {k: v for k, v in out.scores.items() if k != "unsafe"}
    assert codes == approx(expected)


@pytest.mark.parametrize(("semantics", "codes"), [("paper", ("S1", "S14")), ("exact", ("S14",))])
def test_digit_split_greedy_generation(semantics: str, codes: tuple[str, ...]) -> None:
    out = run(GREEDY, SPLIT, semantics, LSPLIT)
    assert out.scores is None
    assert out.pred_labels == codes
    assert out.greedy_text == "unsafe\nS14"


@pytest.mark.parametrize(
    ("strategy", "semantics", "expected"),
    [
        (TOKP, "paper", 0.9),  # the text ends with "unsafe" only after `afe`: p(afe) = .9
        (TOKP, "exact", 0.72),  # p(uns) x p(afe) = .8 x .9
        (FIXED, "paper", 0.9),  # first matched step: running product .9
        (FIXED, "exact", 0.72),  # prefix uns, afe: .8 x .9
    ],
)
def test_two_token_label_unsafe(strategy: str, semantics: str, expected: float) -> None:
    assert run(strategy, SPLIT, semantics, LSPLIT).scores["unsafe"] == approx(expected)


# ---------------------------------------------------------------- a label repeated on one path

# "S2,S2": S then 2 (.8) / 4 (.2); after "S2,S" 2 (.6) / 4 (.4). Greedy: S 1, 2 .8, `,` 1, S 1, 2 .6, EOS.
REPEAT = {
    (): {"S": 1.0},
    ("S",): {"2": 0.8, "4": 0.2},
    ("S", "2"): {",": 1.0},
    ("S", "2", ","): {"S": 1.0},
    ("S", "2", ",", "S"): {"2": 0.6, "4": 0.4},
    ("S", "2", ",", "S", "2"): {EOS: 1.0},
    ("S", "2", ",", "S", "4"): {EOS: 1.0},
    ("S", "4"): {EOS: 1.0},
}
LREP = ("unsafe", "S1", "S2", "S4")


def test_repeat_paper_tree_counts_twice() -> None:
    # S2: .8 at the first `2` + (1 x .8 x 1 x 1) x .6 = .48 at the second: 1.28 > 1.
    # S4: .2 (path S,4) + .8 x .4 = .32 (path S,2,`,`,S,4) = .52.
    out = run(ANY, REPEAT, "paper", LREP)
    assert out.scores == approx({"unsafe": 0.0, "S1": 0.0, "S2": 1.28, "S4": 0.52})


def test_repeat_exact_tree_counts_once() -> None:
    # S2 occurs on the path S,2,... (mass .8, boundary `,` certain) and is counted once: .8.
    # S4: .2 x 1 (EOS) + .8 x .4 x 1 = .52. Nothing unexplored.
    out = run(ANY, REPEAT, "exact", LREP)
    assert out.scores == approx({"unsafe": 0.0, "S1": 0.0, "S2": 0.8, "S4": 0.52})
    assert out.unexplored_mass == approx(0.0)
    assert_bounded(out)


@pytest.mark.parametrize(
    ("strategy", "semantics", "expected"),
    [
        (TOKP, "paper", 0.6),  # overwritten by the later match: p(second 2) = .6
        (FIXED, "paper", 0.48),  # running product .8 then x .6 = .48
        (TOKP, "exact", 0.8),  # first occurrence: p(S) x p(2) = 1 x .8
        (FIXED, "exact", 0.8),  # prefix S,2: 1 x .8
    ],
)
def test_repeat_greedy(strategy: str, semantics: str, expected: float) -> None:
    out = run(strategy, REPEAT, semantics, LREP)
    assert out.greedy_text == "S2,S2"
    assert out.scores == approx({"S2": expected})


# ---------------------------------------------------------------- tree rules

# eps = .1. Node S: 1 (.9), "2\n" (.06: one token, the text "S2\n" confirms S2), 4 (.04).
# Both children below .1 are not expanded (the toy raises if they were forwarded).
EPS = {
    (): {"S": 1.0},
    ("S",): {"1": 0.9, "2\n": 0.06, "4": 0.04},
    ("S", "1"): {EOS: 1.0},
}


def test_eps_pruning_paper() -> None:
    # Labels are counted at the parent before the eps check: S1 .9, S4 .04.
    # "x\nS2\n" does not END with S2, so paper never counts S2.
    out = run(ANY, EPS, "paper", LREP, eps=0.1)
    assert out.scores == approx({"unsafe": 0.0, "S1": 0.9, "S2": 0.0, "S4": 0.04})


def test_eps_pruning_exact() -> None:
    # S1 = .9 x P(boundary | S1) = .9 x 1. The pruned child "2\n" confirms S2 in its own text:
    # S2 = .06. The pruned child `4` leaves S4 pending (its boundary is never seen): S4 = 0.
    # unexplored = .06 + .04 = .1; by label: S2 had occurred on the .06 branch, so S2 gets .04;
    # every other label .1.
    out = run(ANY, EPS, "exact", LREP, eps=0.1)
    assert out.scores == approx({"unsafe": 0.0, "S1": 0.9, "S2": 0.06, "S4": 0.0})
    assert out.unexplored_mass == approx(0.1)
    assert out.unexplored_by_label == approx({"unsafe": 0.1, "S1": 0.1, "S2": 0.04, "S4": 0.1})
    assert_bounded(out)


# top_p .85 at node S: 1 (.6), 2 (.3), 4 (.1): cum .6, .9 -> nucleus {1, 2} in both semantics.
TOPP = {
    (): {"S": 1.0},
    ("S",): {"1": 0.6, "2": 0.3, "4": 0.1},
    ("S", "1"): {EOS: 1.0},
    ("S", "2"): {EOS: 1.0},
}


@pytest.mark.parametrize("semantics", ["paper", "exact"])
def test_top_p_outside_nucleus(semantics: str) -> None:
    out = run(ANY, TOPP, semantics, LREP, top_p=0.85)
    assert out.scores == approx({"unsafe": 0.0, "S1": 0.6, "S2": 0.3, "S4": 0.0})
    if semantics == "exact":  # token 4 (.1) is outside the nucleus: unexplored for every label
        assert out.unexplored_mass == approx(0.1)
        assert out.unexplored_by_label == approx(dict.fromkeys(LREP, 0.1))
        assert_bounded(out)


# Four whole-label tokens at .25 each (exactly representable), each then EOS; top_p .5.
UNIFORM = {
    (): {"unsafe": 0.25, "S1": 0.25, "S2": 0.25, "S4": 0.25},
    ("unsafe",): {EOS: 1.0},
    ("S1",): {EOS: 1.0},
    ("S2",): {EOS: 1.0},
    ("S4",): {EOS: 1.0},
}


def test_top_p_cumulative_equal_to_top_p() -> None:
    # exact: smallest set whose cumulative REACHES .5 -> 2 tokens; the other .5 is unexplored.
    # paper: up to and including the first cumulative that EXCEEDS .5 (.75) -> 3 tokens.
    ex = run(ANY, UNIFORM, "exact", LREP, top_p=0.5)
    pa = run(ANY, UNIFORM, "paper", LREP, top_p=0.5)
    assert sorted(nonzero(ex.scores).values()) == approx([0.25, 0.25])
    assert sorted(nonzero(pa.scores).values()) == approx([0.25, 0.25, 0.25])
    assert ex.unexplored_mass == approx(0.5)
    assert ex.unexplored_by_label == approx(dict.fromkeys(LREP, 0.5))
    assert_bounded(ex)


# max_new_tokens = 2. Node S,1 (depth 2): 4 (.5), `,` (.3), EOS (.2). Nodes at depth 3 do not exist
# in the script (the toy raises if forwarded).
DEPTH = {
    (): {"S": 1.0},
    ("S",): {"1": 0.6, "2": 0.4},
    ("S", "1"): {"4": 0.5, ",": 0.3, EOS: 0.2},
    ("S", "2"): {EOS: 1.0},
}
LDEPTH = ("unsafe", "S1", "S2", "S14")


def test_depth_cap_paper() -> None:
    # Node S,1 at depth 2 = max_new_tokens still counts its children (paths of 3 tokens):
    # S14 += .6 x .5 = .3. S1 = .6, S2 = .4 counted at depth 1.
    out = run(ANY, DEPTH, "paper", LDEPTH, max_new_tokens=2)
    assert out.scores == approx({"unsafe": 0.0, "S1": 0.6, "S2": 0.4, "S14": 0.3})


def test_depth_cap_exact() -> None:
    # Paths stop at 2 tokens. At S,1 (c .6): S1 pending, boundary mass .3 + .2 = .5 -> S1 = .3.
    # Continuation mass .6 x (1 - .2 EOS) = .48 is unexplored; for S1 only its non-boundary part
    # .6 x .5 = .3 (where S1 has not occurred). At S,2 (c .4): S2 = .4 x 1 (EOS), nothing left.
    out = run(ANY, DEPTH, "exact", LDEPTH, max_new_tokens=2)
    assert out.scores == approx({"unsafe": 0.0, "S1": 0.3, "S2": 0.4, "S14": 0.0})
    assert out.unexplored_mass == approx(0.48)
    assert out.unexplored_by_label == approx({"unsafe": 0.48, "S1": 0.3, "S2": 0.48, "S14": 0.48})
    assert_bounded(out)


# EOS rule 1: at S,1 the first child is EOS with .75 >= .7: `,` (.2) and 4 (.05) are skipped.
EOS1 = {
    (): {"S": 1.0},
    ("S",): {"1": 1.0},
    ("S", "1"): {EOS: 0.75, ",": 0.2, "4": 0.05},
}
LEOS = ("unsafe", "S1", "S2", "S4", "S14")


def test_eos_rule1_paper() -> None:
    # S1 = 1.0 (child 1 of S). Child 4 is never reached, so S14 = 0.
    out = run(ANY, EOS1, "paper", LEOS)
    assert nonzero(out.scores) == approx({"S1": 1.0})


def test_eos_rule1_exact() -> None:
    # S1 = 1 x P(boundary after S1) = .75 + .2 = .95. Skipped siblings: .25 unexplored;
    # for S1 only the non-boundary part (token 4) .05.
    out = run(ANY, EOS1, "exact", LEOS)
    assert nonzero(out.scores) == approx({"S1": 0.95})
    assert out.unexplored_mass == approx(0.25)
    assert out.unexplored_by_label == approx({"unsafe": 0.25, "S1": 0.05, "S2": 0.25, "S4": 0.25, "S14": 0.25})
    assert_bounded(out)


@pytest.mark.parametrize(
    ("dist", "paper", "exact", "unexplored"),
    [
        # Child 2 is `2` (not EOS): paper counts S2 += .15 but does not expand it; exact leaves
        # children 2 and 3 unexplored: 1 - (.5 + .3) = .2.
        ({"1": 0.5, EOS: 0.3, "2": 0.15, "4": 0.05}, {"S1": 0.5, "S2": 0.15}, {"S1": 0.5}, 0.2),
        # Child 2 is EOS itself: it ends its path (covered); only token 4 (.05) is unexplored.
        ({"1": 0.5, "2": 0.3, EOS: 0.15, "4": 0.05}, {"S1": 0.5, "S2": 0.3}, {"S1": 0.5, "S2": 0.3}, 0.05),
    ],
)
def test_eos_rule2(dist: dict[str, float], paper: dict[str, float], exact: dict[str, float], unexplored: float) -> None:
    # Nucleus at S (top_p .99): all four tokens (cum .95 < .99); EOS is a candidate.
    script = {(): {"S": 1.0}, ("S",): dist, ("S", "1"): {EOS: 1.0}, ("S", "2"): {EOS: 1.0}}
    assert nonzero(run(ANY, script, "paper", LEOS).scores) == approx(paper)
    ex = run(ANY, script, "exact", LEOS)
    assert nonzero(ex.scores) == approx(exact)
    assert ex.unexplored_mass == approx(unexplored)
    assert ex.unexplored_by_label == approx(dict.fromkeys(LEOS, unexplored))
    assert_bounded(ex)


# ---------------------------------------------------------------- both semantics agree (SPEC §2.1 last paragraph)

# Whole-label tokens, no repeats, every code followed by a boundary, depth far from 50.
# Greedy: unsafe .9, \n 1, S1 .6, `,` 1, S2 .75, EOS. The non-label steps of the greedy path
# have probability 1 (see the report: otherwise paper's fixed_place, which skips them, differs).
SINGLE = {
    (): {"unsafe": 0.9, "safe": 0.1},
    ("safe",): {EOS: 1.0},
    ("unsafe",): {"\n": 1.0},
    ("unsafe", "\n"): {"S1": 0.6, "S2": 0.4},
    ("unsafe", "\n", "S2"): {EOS: 1.0},
    ("unsafe", "\n", "S1"): {",": 1.0},
    ("unsafe", "\n", "S1", ","): {"S2": 0.75, "S4": 0.25},
    ("unsafe", "\n", "S1", ",", "S2"): {EOS: 1.0},
    ("unsafe", "\n", "S1", ",", "S4"): {EOS: 1.0},
}


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        (TOKP, {"unsafe": 0.9, "S1": 0.6, "S2": 0.75}),
        (FIXED, {"unsafe": 0.9, "S1": 0.9 * 0.6, "S2": 0.9 * 0.6 * 0.75}),  # .54, .405
        # unsafe .9; S1 .9 x .6 = .54; S2 .9 x .4 + .54 x .75 = .36 + .405 = .765; S4 .54 x .25 = .135
        (ANY, {"unsafe": 0.9, "S1": 0.54, "S2": 0.765, "S4": 0.135}),
    ],
)
@pytest.mark.parametrize("semantics", ["paper", "exact"])
def test_single_token_codes_semantics_agree(strategy: str, expected: dict[str, float], semantics: str) -> None:
    out = run(strategy, SINGLE, semantics, LREP)
    assert nonzero(out.scores) == approx(expected)
    if strategy == ANY and semantics == "exact":
        assert out.unexplored_mass == approx(0.0)
        assert_bounded(out)


def test_single_token_codes_fixed_place_needs_certain_separators() -> None:
    # Same model but p(\n | unsafe) = .95 (EOS .05): paper's fixed_place skips the unmatched \n step
    # (S1 = .9 x .6 = .54, S2 = .54 x .75 = .405) while exact multiplies the whole prefix
    # (S1 = .9 x .95 x .6 = .513, S2 = .513 x .75 = .38475); token_probability still agrees.
    script = {**SINGLE, ("unsafe",): {"\n": 0.95, EOS: 0.05}}
    assert run(FIXED, script, "paper", LREP).scores == approx({"unsafe": 0.9, "S1": 0.54, "S2": 0.405})
    assert run(FIXED, script, "exact", LREP).scores == approx({"unsafe": 0.9, "S1": 0.513, "S2": 0.38475})
    expected = {"unsafe": 0.9, "S1": 0.6, "S2": 0.75}
    assert run(TOKP, script, "paper", LREP).scores == approx(expected)
    assert run(TOKP, script, "exact", LREP).scores == approx(expected)


@pytest.mark.parametrize("semantics", ["paper", "exact"])
def test_single_token_codes_greedy_generation(semantics: str) -> None:
    out = run(GREEDY, SINGLE, semantics, LREP)
    assert out.pred_labels == ("S1", "S2")
    assert out.greedy_text == "unsafe\nS1,S2"


# ---------------------------------------------------------------- forced prefix

# One-token codes with a certain boundary after each: raw logits 2, 1, .5 for 1, 2, 4.
ONE_TOKEN = {
    PREFIX: {},  # replaced below by raw logits
    (*PREFIX, "1"): {EOS: 1.0},
    (*PREFIX, "2"): {",": 1.0},
    (*PREFIX, "4"): {"\n": 1.0},
}


def _raw(**logits: float) -> dict[str, float]:
    return Raw({k.removeprefix("d"): v for k, v in logits.items()})


ONE_TOKEN[PREFIX] = _raw(d1=2.0, d2=1.0, d4=0.5)
# softmax(2, 1, .5) = (e^2, e, e^.5) / 11.756059 = (.6285317, .2312239, .1402444)
ONE_TOKEN_U = {
    "probability_uncertainty": 1 / (1 + 0.6285317),  # .6140501
    # -(.6285317 ln .6285317 + .2312239 ln .2312239 + .1402444 ln .1402444) = .291882 + .338593 + .275484
    "entropy_uncertainty": 0.9059593,
    # a = (1, 2), a0 = 3: EU = 2 / (3 + 2) = .4; AU = -(1/3)(psi(2) - psi(4)) - (2/3)(psi(3) - psi(4))
    # = (1/3)(1/2 + 1/3) + (2/3)(1/3) = 5/18 + 4/18 = 1/2; u = .4 / .5 = .8
    "LogTokU": 0.8,
}


@pytest.mark.parametrize("semantics", ["paper", "exact"])
@pytest.mark.parametrize("strategy", FORCED)
def test_forced_one_token_codes_exact_equals_paper(strategy: str, semantics: str) -> None:
    # exact evidence = z + log p(d) + log 1 = raw logit d: both semantics see (2, 1, .5).
    out = run(strategy, ONE_TOKEN, semantics, ("unsafe", "S1", "S2", "S4"))
    assert out.uncertainty == pytest.approx(ONE_TOKEN_U[strategy], abs=1e-5)
    assert out.ranked == ("S1", "S2", "S4")
    assert out.gate_unsafe is None
    if semantics == "paper":
        assert out.scores is None
    else:
        assert out.scores == pytest.approx({"S1": 0.6285317, "S2": 0.2312239, "S4": 0.1402444}, abs=1e-5)


def _multi(logit1: float, logit2: float) -> dict[tuple[str, ...], dict[str, float]]:
    # After the prefix: raw logits for 1 and 2. After `1`: 4 (.6), 0 (.1), `,` (.2), EOS (.1),
    # so P(boundary | S1) = .3. After 14: EOS; after 10: `,`; after 2: EOS (boundaries certain).
    return {
        PREFIX: _raw(d1=logit1, d2=logit2),
        (*PREFIX, "1"): {"4": 0.6, "0": 0.1, ",": 0.2, EOS: 0.1},
        (*PREFIX, "1", "4"): {EOS: 1.0},
        (*PREFIX, "1", "0"): {",": 1.0},
        (*PREFIX, "2"): {EOS: 1.0},
    }


LCODES = ("unsafe", "S1", "S2", "S10", "S14")
E = math.e
K = E / (E + 1)  # p(1 | prefix) with logits 3, 2 = .7310586
# exact evidence (z = ln(e^3 + e^2), z + log p(1) = 3): S1 = 3 + ln .3, S2 = 2, S10 = 3 + ln .1,
# S14 = 3 + ln .6 + ln 1 = 2.4891744. Softmax over codes: e^3 (.3, .1, .6) and e^2 over e^3 + e^2:
# S1 .3K, S2 1 - K, S10 .1K, S14 .6K.
MULTI_EXACT_SCORES = {"S1": 0.3 * K, "S2": 1 - K, "S10": 0.1 * K, "S14": 0.6 * K}
A14 = 3 + math.log(0.6)


def _logtoku_oracle(a: list[float]) -> float:
    a0 = sum(a)
    au = -sum(x / a0 * (digamma(x + 1) - digamma(a0 + 1)) for x in a)
    return 2 / (a0 + 2) / au


MULTI_U = {
    "exact": {
        "probability_uncertainty": 1 / (1 + 0.6 * K),  # .6951033
        # H = K x H(.3, .1, .6) + H_binary(K) = 1.2386540
        "entropy_uncertainty": 1.2386540,
        "LogTokU": _logtoku_oracle([2.0, A14]),  # top-2 evidence 2.4891744 and 2: .5240509
    },
    "paper": {
        # raw logits of `1` (S1, S10, S14 share it) and `2`: (3, 2, 3, 3); max p = e / (3e + 1)
        "probability_uncertainty": 1 / (1 + E / (3 * E + 1)),  # .7710560
        "entropy_uncertainty": 1.3235151,  # H(e, 1, e, e over 3e + 1)
        # a = (3, 3), a0 = 6: EU = 2/8; AU = psi(7) - psi(4) = 1/4 + 1/5 + 1/6 = 37/60; u = 15/37
        "LogTokU": 15 / 37,
    },
}


@pytest.mark.parametrize("strategy", FORCED)
def test_forced_multi_token_code_exact(strategy: str) -> None:
    out = run(strategy, _multi(3.0, 2.0), "exact", LCODES)
    assert out.ranked == ("S14", "S2", "S1", "S10")
    assert out.scores == pytest.approx(MULTI_EXACT_SCORES, abs=1e-5)
    assert out.uncertainty == pytest.approx(MULTI_U["exact"][strategy], abs=1e-5)


@pytest.mark.parametrize("strategy", FORCED)
def test_forced_multi_token_code_paper_ties(strategy: str) -> None:
    # S1, S10, S14 all read the logit 3 of `1`: tie -> string order S1 < S10 < S14, then S2 (2).
    out = run(strategy, _multi(3.0, 2.0), "paper", LCODES)
    assert out.ranked == ("S1", "S10", "S14", "S2")
    assert out.scores is None
    assert out.uncertainty == pytest.approx(MULTI_U["paper"][strategy], abs=1e-5)


def test_forced_paper_ties_string_order_s10_before_s2() -> None:
    # Logits 2 and 2: all four codes tie; string order puts S10, S14 before S2 (taxonomy order
    # would be S1, S2, S10, S14). u = 1 / (1 + 1/4) = .8.
    out = run("probability_uncertainty", _multi(2.0, 2.0), "paper", LCODES)
    assert out.ranked == ("S1", "S10", "S14", "S2")
    assert out.uncertainty == approx(0.8)
    # LogTokU: a = (2, 2), a0 = 4: EU = 2/6; AU = psi(5) - psi(3) = 1/3 + 1/4 = 7/12; u = 4/7.
    assert run("LogTokU", _multi(2.0, 2.0), "paper", LCODES).uncertainty == pytest.approx(4 / 7, abs=1e-5)
    # exact: evidence 2 + ln .3, 2, 2 + ln .1, 2 + ln .6 -> S2, S14, S1, S10.
    assert run("LogTokU", _multi(2.0, 2.0), "exact", LCODES).ranked == ("S2", "S14", "S1", "S10")


# ---------------------------------------------------------------- safe/unsafe gate

# First token: uns .6, safe .4. But p(afe | uns) = .5, so P(unsafe, boundary) = .3 < P(safe, boundary) = .4.
GATE = {
    (): {"uns": 0.6, "safe": 0.4},
    ("uns",): {"afe": 0.5, "x": 0.5},
    ("uns", "afe"): {"\n": 1.0},
    ("safe",): {"\n": 1.0},
    PREFIX: _raw(d1=2.0, d2=1.0),
    (*PREFIX, "1"): {EOS: 1.0},
    (*PREFIX, "2"): {EOS: 1.0},
}


@pytest.mark.parametrize("strategy", FORCED)
def test_gate_paper_first_token(strategy: str) -> None:
    # softmax(ln .6, ln .4)[unsafe] = .6 > .5: unsafe.
    out = run(strategy, GATE, "paper", ("unsafe", "S1", "S2"), gate=True)
    assert out.gate_unsafe is True
    assert out.extra["gate_unsafe_score"] == approx(0.6)


@pytest.mark.parametrize("strategy", FORCED)
def test_gate_exact_full_word(strategy: str) -> None:
    # .3 / (.3 + .4) = 3/7 < .5: safe. Code scores = 3/7 x softmax(2, 1) = 3/7 x (K, 1 - K).
    out = run(strategy, GATE, "exact", ("unsafe", "S1", "S2"), gate=True)
    assert out.gate_unsafe is False
    assert out.extra["gate_unsafe_score"] == approx(3 / 7)
    assert out.scores == pytest.approx({"unsafe": 3 / 7, "S1": 3 / 7 * K, "S2": 3 / 7 * (1 - K)}, abs=1e-5)


# ---------------------------------------------------------------- t_opti (finalize)


def _out(u: float, ranked: tuple[str, str], gate: bool | None = None) -> SampleOutput:
    return SampleOutput(uncertainty=u, ranked=ranked, gate_unsafe=gate)


def test_finalize_transductive() -> None:
    # Eligible samples in ascending u, gain (+1 both top-2 true, -1 only top-1 true):
    # A .1 +1 -> 1; B .2 -1 -> 0; C .3 +1 -> 1; D .4 +1 -> 2; E .5 -1 -> 1. Max 2 at D: t_opti = .4.
    # F (gate said safe) predicts () and is not in the fit (with it, +1 at .45 would give t = .45).
    outs = [
        _out(0.3, ("S1", "S3")),  # C
        _out(0.1, ("S1", "S2")),  # A
        _out(0.5, ("S2", "S4")),  # E
        _out(0.45, ("S2", "S4"), gate=False),  # F
        _out(0.2, ("S2", "S3")),  # B
        _out(0.4, ("S4", "S1"), gate=True),  # D
    ]
    truth = [["S1", "S3"], ["S1", "S2"], ["S2"], ["S2", "S4"], ["S2"], ["S4", "S1"]]
    fitted = finalize(outs, truth, "transductive")
    assert fitted == approx({"t_opti": 0.4})
    # u > .4 -> top-1 (E only), else top-2.
    assert [o.pred_labels for o in outs] == [("S1", "S3"), ("S1", "S2"), ("S2",), (), ("S2", "S3"), ("S4", "S1")]


def test_finalize_transductive_first_maximum() -> None:
    # gains +1, -1, +1 at u .1, .2, .3: running 1, 0, 1 -> the FIRST maximum: t = .1.
    outs = [_out(0.1, ("S1", "S2")), _out(0.2, ("S1", "S2")), _out(0.3, ("S1", "S2"))]
    fitted = finalize(outs, [["S1", "S2"], ["S1"], ["S1", "S2"]], "transductive")
    assert fitted == approx({"t_opti": 0.1})
    assert [o.pred_labels for o in outs] == [("S1", "S2"), ("S1",), ("S1",)]


def test_finalize_split_two_samples() -> None:
    # Two eligible samples -> each fold holds one, whatever the permutation.
    # P: u .2, +1; Q: u .6, +1; R: gate safe. Fit on {P}: t = .2; on {Q}: t = .6.
    # P uses Q's .6: .2 <= .6 -> top-2. Q uses P's .2: .6 > .2 -> top-1.
    # (Transductive: running 1, 2 -> t = .6 -> both top-2.)
    outs = [_out(0.2, ("S1", "S2")), _out(0.6, ("S3", "S4")), _out(0.1, ("S1", "S2"), gate=False)]
    truth = [["S1", "S2"], ["S3", "S4"], ["S1", "S2"]]
    fitted = finalize(outs, truth, "split")
    assert set(fitted) == {"t_opti_fold0", "t_opti_fold1"}
    assert sorted(fitted.values()) == approx([0.2, 0.6])
    assert [o.pred_labels for o in outs] == [("S1", "S2"), ("S3",), ()]
    finalize(outs, truth, "transductive")
    assert [o.pred_labels for o in outs] == [("S1", "S2"), ("S3", "S4"), ()]


@pytest.mark.parametrize("i", range(7))
def test_finalize_split_own_labels_do_not_choose_own_prediction(i: int) -> None:
    # The fold split depends only on the number of eligible samples and the seed, so changing
    # sample i's truth (gain +1, -1 or 0) must leave sample i's own prediction unchanged.
    us = [0.1, 0.25, 0.3, 0.45, 0.5, 0.7, 0.8]
    base = [["S1", "S2"], ["S1"], ["S1", "S2"], [], ["S1", "S2"], ["S1"], ["S1", "S2"]]
    preds = set()
    for own in (["S1", "S2"], ["S1"], []):
        outs = [_out(u, ("S1", "S2")) for u in us]
        truth = [own if j == i else t for j, t in enumerate(base)]
        finalize(outs, truth, "split", seed=0)
        preds.add(outs[i].pred_labels)
        assert all(o.pred_labels in {("S1",), ("S1", "S2")} for o in outs)
    assert len(preds) == 1
