"""The policy's pure core (tier a): calibration maps, threshold objectives, held-out folds, fits.

Expected values are worked by hand or come from data whose true probabilities are known."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from scipy.special import expit, logit
from sklearn.isotonic import IsotonicRegression

from tokmarg.metrics import expected_calibration_error
from tokmarg.policy.fit import FitSpec, fit_strategy, fit_verdict, held_out_rows
from tokmarg.policy.maps import IDENTITY, CalibrationMap, fit_isotonic, fit_map
from tokmarg.policy.objective import Objective, ObjectiveError, choose_threshold, counts_at


def test_isotonic_map_of_the_worked_example_pools_the_pair_that_goes_down():
    m = fit_isotonic(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 1, 0, 1]))
    assert m.x == (0.1, 0.2, 0.3, 0.4) and m.y == (0.0, 0.5, 0.5, 1.0)
    np.testing.assert_allclose(m.apply(np.array([0.25, 0.35, 0.05, 0.9])), [0.5, 0.75, 0.0, 1.0])


def test_isotonic_map_applies_as_scikit_learn_predicts():
    rng = np.random.default_rng(3)
    s, y = rng.random(500), rng.random(500) < 0.4
    m = fit_isotonic(s, y)
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(s, y)
    new = np.r_[rng.random(300), -1.0, 2.0, 0.0, 1.0]
    np.testing.assert_allclose(m.apply(new), iso.predict(new), rtol=0, atol=1e-12)


def test_a_map_read_back_from_yaml_applies_to_the_same_bits():
    rng = np.random.default_rng(4)
    s, y = rng.random(400) ** 2, rng.random(400) < 0.5
    for m in (fit_map("isotonic", s, y), fit_map("platt", s, y), IDENTITY):
        back = CalibrationMap.from_dict(yaml.safe_load(yaml.safe_dump(m.to_dict())), "S1.map")
        assert back == m
        assert np.array_equal(back.apply(s), m.apply(s))


@pytest.mark.parametrize(
    "d, msg",
    [
        ({"kind": "spline"}, "S1.map.kind: 'spline'"),
        ({"kind": "isotonic", "x": [0.1, 0.2], "y": [0.5]}, "same length"),
        ({"kind": "isotonic", "x": [0.2, 0.1], "y": [0.1, 0.5]}, "non-decreasing"),
        ({"kind": "platt", "a": "one", "b": 0, "eps": 1e-6}, "S1.map.a"),
    ],
)
def test_a_bad_map_is_named(d, msg):
    with pytest.raises(ValueError, match=msg):
        CalibrationMap.from_dict(d, "S1.map")


def test_thresholds_of_the_worked_example():
    s, y = np.array([0.9, 0.8, 0.8, 0.3]), np.array([1, 1, 0, 0], dtype=bool)
    assert choose_threshold(s, y, Objective.parse("precision>=0.9")) == (0.9, True)
    assert choose_threshold(s, y, Objective.parse("recall>=1")) == (0.8, True)
    assert choose_threshold(s, y, Objective.parse("f1")) == (0.8, True)
    assert choose_threshold(s, y, Objective.parse("fpr<=0")) == (0.9, True)
    assert choose_threshold(s, y, Objective.parse("fpr<=0.5")) == (0.8, True)
    # no cut reaches precision 1 when the top score is a negative: the best precision, unmet
    assert choose_threshold(np.array([0.9, 0.5]), np.array([0, 1], dtype=bool), Objective.parse("precision>=1")) == (
        0.5,
        False,
    )
    c = counts_at(s, y, 0.8)
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 1, 0, 1) and c.precision == 2 / 3 and c.fpr == 0.5


@pytest.mark.parametrize("text", ["f2", "precision>0.9", "precision>=1.5", "fpr>=0.1", "recall>=x"])
def test_an_objective_that_cannot_be_read_is_one_line(text):
    with pytest.raises(ObjectiveError, match="--objective"):
        Objective.parse(text)


def test_objectives_print_as_written():
    assert [str(Objective.parse(t)) for t in ("F1", "precision >= 0.9", "fpr<=0.05")] == [
        "f1",
        "precision>=0.9",
        "fpr<=0.05",
    ]


def test_held_out_fold_depends_on_the_id_and_seed_only():
    ids = [f"row-{i}" for i in range(20000)]
    held = held_out_rows(ids, 0, 5)
    assert 0.18 < held.mean() < 0.22
    # the same rows in another order, or among other rows, keep their fold
    rev = held_out_rows(ids[::-1], 0, 5)[::-1]
    assert np.array_equal(rev, held)
    assert np.array_equal(held_out_rows(ids[:100], 0, 5), held[:100])
    assert not np.array_equal(held_out_rows(ids, 1, 5), held)


def _known(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.01, 0.99, n)
    y = rng.random(n) < p
    held = held_out_rows([str(i) for i in range(n)], 0, 5)
    return p, y, held


def test_isotonic_halves_the_held_out_ece_of_scores_reported_as_p_squared():
    p, y, held = _known(20000)
    f, cal = fit_verdict("S1", p**2, y, held, FitSpec("isotonic", Objective("f1"), 10, 0.5))
    before, after = f.held_out["ece_before"], f.held_out["ece_after"]
    assert before == pytest.approx(expected_calibration_error(y[held], p[held] ** 2))
    assert before > 0.12  # E[p - p^2] is about 1/6
    assert after <= before / 2
    assert after == pytest.approx(expected_calibration_error(y[held], cal))
    assert f.held_out["brier_after"] < f.held_out["brier_before"]
    np.testing.assert_array_equal(cal, f.map.apply(p[held] ** 2))


def test_platt_recovers_a_logistic_distortion_and_halves_the_ece():
    p, y, held = _known(20000, seed=1)
    s = expit((logit(p) - 0.5) / 2.0)  # the true probability is sigmoid(2 logit(s) + 0.5)
    f, _ = fit_verdict("S1", s, y, held, FitSpec("platt", Objective("f1"), 10, 0.5))
    assert f.map.a == pytest.approx(2.0, abs=0.15) and f.map.b == pytest.approx(0.5, abs=0.15)
    assert f.held_out["ece_after"] <= f.held_out["ece_before"] / 2


def _codes(n: int) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Three codes of growing separability, a fourth with 3 positives, and ``unsafe``."""
    rng = np.random.default_rng(7)
    y = np.zeros((n, 5), dtype=bool)
    raw = np.zeros((n, 5))
    for j, sep in ((1, 1.0), (2, 2.0), (3, 4.0)):
        y[:, j] = rng.random(n) < 0.2
        raw[:, j] = expit(rng.normal(size=n) + sep * (2 * y[:, j] - 1))
    y[:3, 4] = True
    raw[:, 4] = rng.random(n) * 0.1
    raw[:3, 4] = 0.9
    y[:, 0] = y[:, 1:].any(axis=1)
    raw[:, 0] = raw[:, 1:].max(axis=1)
    held = held_out_rows([str(i) for i in range(n)], 0, 5)
    return ["unsafe", "S1", "S2", "S3", "S4"], raw, y, held


def test_precision_objective_holds_on_the_fitting_folds_and_the_held_out_is_only_reported():
    labels, raw, y, held = _codes(6000)
    fit = fit_strategy(labels, raw, y, held, FitSpec("isotonic", Objective.parse("precision>=0.9"), 10, 0.2))
    fitted = [f for f in fit.verdicts if f.fitted]
    assert [f.label for f in fitted] == ["unsafe", "S1", "S2", "S3"]
    for f in fitted:
        # counted here, apart from the code under test: the fitting rows at the policy's map and threshold
        flag = f.map.apply(raw[~held, labels.index(f.label)]) >= f.threshold
        truth = y[~held, labels.index(f.label)]
        assert f.objective_met and flag.any()
        assert truth[flag].mean() >= 0.9
        assert f.fit["precision"] == truth[flag].mean()
        hflag = fit.held_scores[:, labels.index(f.label)] >= f.threshold
        assert f.held_out["precision"] == y[held, labels.index(f.label)][hflag].mean()


def test_a_code_with_too_few_positives_keeps_the_identity_and_the_strategy_threshold():
    labels, raw, y, held = _codes(2000)
    fit = fit_strategy(labels, raw, y, held, FitSpec("isotonic", Objective("f1"), 10, 0.2))
    s4 = fit.verdicts[4]
    assert not s4.fitted and s4.map == IDENTITY and s4.threshold == 0.2 and s4.objective_met is None
    assert "positives in the fitting folds (fewer than 10)" in s4.note
    np.testing.assert_array_equal(fit.held_scores[:, 4], raw[held, 4])


def test_flagged_is_unsafe_or_any_code_at_its_threshold():
    labels, raw, y, held = _codes(3000)
    fit = fit_strategy(labels, raw, y, held, FitSpec("platt", Objective("f1"), 10, 0.2))
    t = np.array([f.threshold for f in fit.verdicts])
    flags = (fit.held_scores >= t).any(axis=1)
    truth = y[held, 1:].any(axis=1)
    tp = int((flags & truth).sum())
    assert fit.summary["flagged"]["precision"] == tp / flags.sum()
    assert fit.summary["flagged"]["recall"] == tp / truth.sum()
    assert fit.summary["flagged"]["rows"] == held.sum()


def test_a_tally_of_batches_gives_the_held_out_numbers_of_the_fit():
    from tokmarg.policy.apply import apply_policy
    from tokmarg.policy.file import Policy, Verdict
    from tokmarg.policy.tally import Tally

    labels, raw, y, held = _codes(3000)
    fit = fit_strategy(labels, raw, y, held, FitSpec("isotonic", Objective("f1"), 10, 0.2))
    verdicts = tuple(
        Verdict(f.label, f.map, f.threshold, f.fitted, f.note, f.objective_met, {}, {}) for f in fit.verdicts
    )
    policy = Policy({}, {}, {}, {"codes": labels[1:]}, {}, {}, {}, verdicts, {}, {})
    tally = Tally(labels, 0.2)
    rows = np.flatnonzero(held)
    for part in np.array_split(rows, 3):  # three batches
        tally.add(raw[part], y[part], apply_policy(policy, raw[part]))
    got = tally.verdicts()
    for f in fit.verdicts:
        for k, want in f.held_out.items():
            assert got[f.label][k] == pytest.approx(want, abs=1e-12, nan_ok=True), (f.label, k)
    for name, rates in fit.summary.items():
        for k, want in rates.items():
            assert tally.totals()[name][k] == pytest.approx(want, abs=1e-12, nan_ok=True), (name, k)


def test_method_none_keeps_the_raw_score_and_fits_only_the_threshold():
    labels, raw, y, held = _codes(2000)
    fit = fit_strategy(labels, raw, y, held, FitSpec("none", Objective.parse("recall>=0.8"), 10, 0.2))
    for f in fit.verdicts:
        assert f.map == IDENTITY
        if f.fitted:
            flag = raw[~held, labels.index(f.label)] >= f.threshold
            assert y[~held, labels.index(f.label)][flag].sum() / y[~held, labels.index(f.label)].sum() >= 0.8


@pytest.mark.parametrize("objective", ["f1", "precision>=0.6", "recall>=0.7", "fpr<=0.2", "precision>=0.99"])
def test_thresholds_are_the_ones_a_brute_force_walk_picks(objective):
    rng = np.random.default_rng(11)
    s = np.round(rng.random(300), 2)  # ties
    y = rng.random(300) < s
    obj = Objective.parse(objective)
    best, met = None, False
    cands = sorted(set(s), reverse=True)  # highest first; each flags s >= t
    rows = []
    for t in cands:
        tp = int(((s >= t) & y).sum())
        fp = int(((s >= t) & ~y).sum())
        rows.append((t, tp, fp))
    pos, neg = int(y.sum()), int((~y).sum())
    if obj.metric == "f1":
        f1 = [2 * tp / (2 * tp + fp + pos - tp) for _, tp, fp in rows]
        best, met = rows[int(np.argmax(f1))][0], True  # first maximum: the highest threshold
    elif obj.metric == "precision":
        ok = [t for t, tp, fp in rows if tp / (tp + fp) >= obj.bound]
        best, met = (ok[-1], True) if ok else (None, False)
    elif obj.metric == "recall":
        ok = [t for t, tp, _ in rows if tp / pos >= obj.bound]
        best, met = ok[0], True
    else:
        ok = [t for t, _, fp in rows if fp / neg <= obj.bound]
        best, met = (ok[-1] if ok else np.inf), True
    t, got_met = choose_threshold(s, y, obj)
    assert got_met == met
    if best is not None:
        assert t == best


def _policy_doc() -> dict:
    v = {"fitted": False, "note": "", "map": {"kind": "identity"}, "threshold": 0.5, "fit": {}, "held_out": {}}
    return {
        "format": "tokmarg-policy/1",
        "model": {"id": "m", "sha256": "a" * 64, "files": {"config.json": "b" * 64}, "dtype": "float32"},
        "prompt": {"format": "instruct", "sha256": "c" * 64, "answer_prefix": ""},
        "taxonomy": {"name": "llama_guard_3", "codes": ["S1", "S2"], "excluded": []},
        "strategy": {"name": "token_probability", "semantics": "exact", "params": {"threshold": 0.2}},
        "calibration": {"method": "isotonic", "objective": "f1", "folds": 5, "seed": 0, "min_positives": 10},
        "dataset": {"sha256": "d" * 64, "rows": 10, "partition_size": 32},
        "verdicts": {"S2": dict(v), "unsafe": dict(v), "S1": {**v, "threshold": 0.25}},
    }


def test_a_policy_reads_its_verdicts_in_the_order_of_the_scores(tmp_path):
    from tokmarg.policy.file import read_policy

    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(_policy_doc()), encoding="utf-8")
    pol = read_policy(p)
    assert pol.labels == ("unsafe", "S1", "S2") and pol.verdicts[1].threshold == 0.25


@pytest.mark.parametrize(
    "change, msg",
    [
        (lambda d: d["verdicts"].pop("unsafe"), "verdicts: no verdict for 'unsafe'"),
        (lambda d: d["verdicts"].pop("S2"), "verdicts: no verdict for 'S2'"),
        (lambda d: d["verdicts"].update(S9=d["verdicts"]["S1"]), "verdicts.S9: not a code"),
        (lambda d: d["calibration"].update(folds=1), "calibration.folds: expected a whole number >= 2"),
        (lambda d: d["calibration"].pop("seed"), "calibration.seed"),
        (lambda d: d["dataset"].update(partition_size="32"), "dataset.partition_size"),
        (lambda d: d["model"].update(files=["config.json"]), "model.files: expected a mapping"),
        (lambda d: d["strategy"].pop("semantics"), "strategy.semantics: missing"),
        (lambda d: d["verdicts"]["S1"].update(threshold=float("nan")), "verdicts.S1.threshold"),
        (lambda d: d["verdicts"]["S1"].update(map={"kind": "platt", "a": float("inf"), "b": 0, "eps": 1e-6}), "finite"),
        (lambda d: d.update(format="other/2"), "format: expected 'tokmarg-policy/1'"),
    ],
)
def test_a_malformed_policy_is_named_in_one_line(tmp_path, change, msg):
    from tokmarg.policy.file import PolicyError, read_policy

    doc = _policy_doc()
    change(doc)
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(doc), encoding="utf-8")
    with pytest.raises(PolicyError, match=msg) as e:
        read_policy(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)
