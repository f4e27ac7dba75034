"""Tier a (no model): params.yaml + CLI choices -> Config, tokmarg.config.

Precedence of a strategy parameter for one model (highest first):
``models.<m>.strategies.<s>`` > ``models.<m>`` > ``strategies.<s>`` > StrategyParams defaults.
Every error is one line naming the file and the key.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tokmarg.config import ConfigError, build_config, load_params
from tokmarg.models import DEFAULT_MODEL
from tokmarg.strategies import REGISTRY, StrategyParams

REPO = Path(__file__).resolve().parents[1]
PAPER_PARAMS = Path(__file__).resolve().parents[2] / "shared" / "params-paper.yaml"
ALL = tuple(REGISTRY)
ANY = "marginal_probability_at_any_place"
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
GUARD3 = "meta-llama/Llama-Guard-3-8B"


def write(tmp_path: Path, text: str, name: str = "params.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def config_error(path: Path | str, *keys: str, **kwargs) -> str:
    """build_config must raise ConfigError with a one-line message naming the file and every key."""
    with pytest.raises(ConfigError) as e:
        build_config(path, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    for k in keys:
        assert k in msg, (k, msg)
    return msg


# --- defaults and shipped files ---------------------------------------------------------


def test_registry_has_the_seven_strategies() -> None:
    assert ALL == (
        "greedy_generation",
        "token_probability",
        "marginal_probability_at_fixed_place",
        "marginal_probability_at_any_place",
        "probability_uncertainty",
        "entropy_uncertainty",
        "LogTokU",
    )


@pytest.mark.parametrize("text", ["", "# nothing\n", "seed: 0\n", "strategies: {}\nmodels: {}\ntaxonomies: {}\n"])
def test_defaults_when_keys_missing(tmp_path: Path, text: str) -> None:
    p = write(tmp_path, text)
    cfg = build_config(p)
    assert cfg.path == str(p)
    assert cfg.semantics == "exact"
    assert cfg.calibration == "transductive"
    assert cfg.taxonomy.name == "llama_guard_3" and cfg.taxonomy.codes == tuple(f"S{i}" for i in range(1, 15))
    assert cfg.strategies == ALL and len(cfg.strategies) == 7
    assert cfg.seed == 0
    (m,) = cfg.models
    assert m.name == DEFAULT_MODEL
    assert m.prompt == "instruct"
    assert m.taxonomy.name == "llama_guard_3"
    assert m.answer_prefix == ""
    assert m.device == "auto" and m.dtype == "auto"
    assert m.params == {s: StrategyParams() for s in ALL}
    assert StrategyParams() == StrategyParams(top_p=0.99, max_new_tokens=50, eps=0.01, threshold=0.2)


META_OWN = {  # the shipped entries of Meta's guards and the policy each one's template writes
    "meta-llama/Meta-Llama-Guard-2-8B": "llama_guard_2_8b",
    GUARD3: "llama_guard_3_8b",
    "meta-llama/Llama-Guard-3-1B": "llama_guard_3_1b",
    "meta-llama/Llama-Guard-3-11B-Vision": "llama_guard_3_11b_vision",
    "meta-llama/Llama-Guard-4-12B": "llama_guard_4_12b",
}
FEWER_CODES = ("meta-llama/Meta-Llama-Guard-2-8B", "meta-llama/Llama-Guard-3-1B", "meta-llama/Llama-Guard-3-11B-Vision")


def test_shipped_params_validate() -> None:
    p = REPO / "params.yaml"
    raw = load_params(p)
    names = [n for n in raw["models"] if n not in FEWER_CODES]  # 11 or 13 codes: not on a 14-code run
    cfg = build_config(p, models=names)
    for m in cfg.models:
        if m.name in META_OWN:
            assert m.prompt == "guard" and m.taxonomy.name == META_OWN[m.name] and m.answer_prefix == "\n\n"
    assert cfg.semantics == "exact" and cfg.calibration == "transductive" and cfg.strategies == ALL
    by = {m.name: m for m in cfg.models}
    assert list(by) == names
    assert by[GUARD3].prompt == "guard" and by[GUARD3].answer_prefix == "\n\n"
    assert by[LLAMA].params["greedy_generation"] == StrategyParams(0.9, 20, 0.01, 0.3)
    assert by[LLAMA].params[ANY] == StrategyParams(0.9, 8, 0.01, 0.3)
    assert by[GUARD3].params[ANY] == StrategyParams(0.99, 8, 0.01, 0.2)
    assert build_config(p).models[0].name == DEFAULT_MODEL


def test_shipped_13_code_guards_run_with_s14_excluded(tmp_path: Path) -> None:
    """Llama Guard 3 1B / 11B-Vision know S1-S13: a 14-code run refuses them in one line naming
    the fix; with `exclude_codes: [S14]` they run, S14 gone from the labels and their policy."""
    text = (REPO / "params.yaml").read_text(encoding="utf-8")
    one_b = "meta-llama/Llama-Guard-3-1B"
    with pytest.raises(ConfigError) as e:
        build_config(REPO / "params.yaml", models=[one_b])
    assert "lacks S14 of the run's taxonomy llama_guard_3: add `exclude_codes: [S14]`" in str(e.value)
    p = write(tmp_path, text.replace("exclude_codes: []", "exclude_codes: [S14]"))
    cfg = build_config(p, models=[one_b, GUARD3])
    assert cfg.taxonomy.codes == tuple(f"S{i}" for i in range(1, 14)) and cfg.taxonomy.excluded_codes == ("S14",)
    lg1, lg8 = cfg.models
    assert lg1.taxonomy.codes == cfg.taxonomy.codes and lg1.exclude_codes == ()  # S14 is not in its policy anyway
    assert lg8.taxonomy.codes == cfg.taxonomy.codes and lg8.exclude_codes == ("S14",)


MINE = "taxonomies:\n  mine: [{code: A, name: a}, {code: B, name: b}]\n"


@pytest.mark.parametrize(
    ("text", "models", "needle"),
    [
        ("exclude_codes: S14\n", None, "exclude_codes: 'S14' must be a list of category codes"),
        ("exclude_codes: [S15]\n", None, "exclude_codes: unknown code(s) ['S15'] for taxonomy llama_guard_3"),
        (MINE + "taxonomy: mine\nexclude_codes: [A, B]\n", None, "exclude_codes: leaves taxonomy mine without"),
        ("models:\n  m:\n    exclude_codes: [S1]\n", ["m"], "models.m.taxonomy: llama_guard_3 (less its"),
        ("models:\n  m:\n    exclude_codes: [S1]\n", ["m"], "lacks S1 of the run's taxonomy llama_guard_3"),
        (MINE + "taxonomy: mine\nmodels:\n  m:\n    exclude_codes: [A, B]\n", ["m"], "models.m.exclude_codes: leaves"),
        ("models:\n  m:\n    taxonomy: llama_guard_2_8b\n", ["m"], "names other categories than the run's"),
    ],
)
def test_exclude_codes_and_model_taxonomy_errors(tmp_path: Path, text: str, models, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        build_config(write(tmp_path, text), models=models)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_shipped_params_with_paper_template(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(REPO)
    p = write(tmp_path, f"models:\n  {LLAMA}:\n    prompt: examples/paper_instruct.yaml\n")
    (m,) = build_config(p, models=[LLAMA]).models
    assert m.prompt == "examples/paper_instruct.yaml"


@pytest.mark.skipif(not PAPER_PARAMS.is_file(), reason="shared/params-paper.yaml absent")
def test_paper_params_validate() -> None:
    cfg = build_config(PAPER_PARAMS, models=[LLAMA])
    assert cfg.semantics == "paper" and cfg.calibration == "transductive"
    assert cfg.strategies == ALL
    (m,) = cfg.models
    for s in ALL:
        assert m.params[s].top_p == 0.9, s
        assert m.params[s].threshold == 0.3, s
        assert m.params[s].eps == 0.01, s
        assert m.params[s].max_new_tokens == (20 if s == ANY else 50), s
    other = build_config(PAPER_PARAMS, models=[GUARD3]).models[0]
    assert other.params[ANY] == StrategyParams(0.99, 20, 0.01, 0.2)


# --- precedence -------------------------------------------------------------------------

PRECEDENCE = """\
strategies:
  greedy_generation: {top_p: 0.5, eps: 0.02}
  token_probability: {top_p: 0.5, max_new_tokens: 7}
  LogTokU: {threshold: 0.6}
models:
  m:
    top_p: 0.6
    threshold: 0.4
    strategies:
      token_probability: {top_p: 0.7, max_new_tokens: 9}
      LogTokU: {threshold: 0.8}
"""


def test_precedence(tmp_path: Path) -> None:
    p = write(tmp_path, PRECEDENCE)
    cfg = build_config(p, models=["m", "n"])
    # only the strategies listed under `strategies:` are chosen, in registry order
    assert cfg.strategies == ("greedy_generation", "token_probability", "LogTokU")
    m, n = cfg.models
    assert (m.name, n.name) == ("m", "n")
    # greedy: models.m (0.6, 0.4) > strategies.greedy (0.5, eps 0.02) > defaults (50)
    assert m.params["greedy_generation"] == StrategyParams(top_p=0.6, max_new_tokens=50, eps=0.02, threshold=0.4)
    # token_probability: models.m.strategies.token_probability wins for top_p and max_new_tokens
    assert m.params["token_probability"] == StrategyParams(top_p=0.7, max_new_tokens=9, eps=0.01, threshold=0.4)
    # LogTokU: models.m.strategies.LogTokU.threshold > models.m.threshold > strategies.LogTokU.threshold
    assert m.params["LogTokU"] == StrategyParams(top_p=0.6, max_new_tokens=50, eps=0.01, threshold=0.8)
    # model n has no entry: strategy values, then defaults
    assert n.params["greedy_generation"] == StrategyParams(top_p=0.5, max_new_tokens=50, eps=0.02, threshold=0.2)
    assert n.params["token_probability"] == StrategyParams(top_p=0.5, max_new_tokens=7, eps=0.01, threshold=0.2)
    assert n.params["LogTokU"] == StrategyParams(threshold=0.6)


def test_precedence_for_strategy_chosen_on_cli(tmp_path: Path) -> None:
    p = write(tmp_path, PRECEDENCE)
    cfg = build_config(p, models=["m"], strategies=[ANY])
    assert cfg.strategies == (ANY,)
    assert cfg.models[0].params == {ANY: StrategyParams(top_p=0.6, max_new_tokens=50, eps=0.01, threshold=0.4)}


def test_params_types(tmp_path: Path) -> None:
    p = write(tmp_path, "strategies:\n  greedy_generation: {top_p: 1, eps: 0, threshold: 1, max_new_tokens: 1}\n")
    sp = build_config(p).models[0].params["greedy_generation"]
    assert sp == StrategyParams(1.0, 1, 0.0, 1.0)
    assert isinstance(sp.top_p, float) and isinstance(sp.eps, float) and isinstance(sp.threshold, float)
    assert isinstance(sp.max_new_tokens, int)


def test_model_settings(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        'prompt: guard\nmodels:\n  a: {answer_prefix: "\\n\\n", device: cpu, dtype: bf16}\n  b: {prompt: instruct}\n',
    )
    a, b, c = build_config(p, models=["a", "b", "c"], device="cuda", dtype="fp32").models
    assert (a.prompt, a.answer_prefix, a.device, a.dtype) == ("guard", "\n\n", "cpu", "bf16")
    assert (b.prompt, b.device, b.dtype) == ("instruct", "cuda", "fp32")
    assert (c.prompt, c.device, c.dtype) == ("guard", "cuda", "fp32")


def test_prompt_template_file(tmp_path: Path) -> None:
    tpl = write(tmp_path, "user: hi\n", "tpl.yaml")
    p = write(tmp_path, f"models:\n  m: {{prompt: {tpl}}}\n")
    assert build_config(p, models=["m"]).models[0].prompt == str(tpl)


# --- CLI choices ------------------------------------------------------------------------


def test_strategies_subset(tmp_path: Path) -> None:
    p = write(tmp_path, "")
    cfg = build_config(p, strategies=["LogTokU", "greedy_generation", "LogTokU"])
    assert cfg.strategies == ("greedy_generation", "LogTokU")  # registry order, no duplicates
    assert set(cfg.models[0].params) == {"greedy_generation", "LogTokU"}


def test_unknown_strategy_on_cli(tmp_path: Path) -> None:
    p = write(tmp_path, "")
    with pytest.raises(ConfigError) as e:
        build_config(p, strategies=["greedy_generation", "beam_search"])
    msg = str(e.value)
    assert "\n" not in msg and "--strategies" in msg and "beam_search" in msg
    for s in ALL:
        assert s in msg


def test_semantics_override(tmp_path: Path) -> None:
    p = write(tmp_path, "semantics: exact\n")
    assert build_config(p).semantics == "exact"
    assert build_config(p, semantics="paper").semantics == "paper"
    assert build_config(write(tmp_path, "semantics: paper\n", "b.yaml"), semantics="exact").semantics == "exact"


def test_bad_semantics_on_cli(tmp_path: Path) -> None:
    p = write(tmp_path, "")
    with pytest.raises(ConfigError) as e:
        build_config(p, semantics="approximate")
    msg = str(e.value)
    assert "\n" not in msg and "--semantics" in msg and "approximate" in msg and "exact" in msg and "paper" in msg


def test_bad_semantics_in_file(tmp_path: Path) -> None:
    msg = config_error(write(tmp_path, "semantics: approximate\n"), "semantics", "approximate", "exact", "paper")
    assert "--semantics" not in msg


def test_bad_dtype_on_cli(tmp_path: Path) -> None:
    # a CLI choice is reported under its flag, not under a params key
    with pytest.raises(ConfigError, match=r"^--dtype: 'fp8' is not allowed; allowed: auto, .*bf16"):
        build_config(write(tmp_path, ""), dtype="fp8")


# --- errors naming the key --------------------------------------------------------------


def test_missing_params_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    config_error(missing, "no such")
    with pytest.raises(ConfigError):
        build_config(tmp_path)  # a directory


@pytest.mark.parametrize("text", ["a: [1, 2\n", "a: b: c\n", "key: 'unclosed\n", "\tsemantics: exact\n"])
def test_invalid_yaml(tmp_path: Path, text: str) -> None:
    config_error(write(tmp_path, text), "not valid YAML")


def test_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "params.yaml"
    p.write_bytes(b"semantics: caf\xe9\n")
    config_error(p)


@pytest.mark.parametrize("text", ["- semantics\n- exact\n", "just a string\n", "42\n"])
def test_top_level_not_a_mapping(tmp_path: Path, text: str) -> None:
    config_error(write(tmp_path, text), "mapping")


def test_unknown_top_level_key(tmp_path: Path) -> None:
    config_error(write(tmp_path, "semantic: exact\n"), "semantic", "allowed", "semantics", "calibration", "models")


def test_unknown_strategy_in_file(tmp_path: Path) -> None:
    config_error(write(tmp_path, "strategies:\n  beam_search: {top_p: 0.9}\n"), "strategies.beam_search", *ALL)


def test_unknown_strategy_under_model(tmp_path: Path) -> None:
    p = write(tmp_path, "models:\n  m:\n    strategies:\n      beam_search: {top_p: 0.9}\n")
    config_error(p, "models.m.strategies.beam_search", "LogTokU", models=["m"])


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("strategies:\n  greedy_generation: {top_q: 0.9}\n", "strategies.greedy_generation.top_q"),
        (
            "models:\n  m:\n    strategies:\n      greedy_generation: {top_q: 0.9}\n",
            "models.m.strategies.greedy_generation.top_q",
        ),
    ],
)
def test_unknown_param_key(tmp_path: Path, text: str, key: str) -> None:
    msg = config_error(write(tmp_path, text), key, "allowed", models=["m"])
    assert "top_p, max_new_tokens, eps, threshold" in msg


def test_unknown_model_key(tmp_path: Path) -> None:
    msg = config_error(write(tmp_path, "models:\n  m: {top_q: 0.9}\n"), "models.m.top_q", "allowed", models=["m"])
    for k in ("prompt", "taxonomy", "answer_prefix", "device", "dtype", "strategies", "top_p", "max_new_tokens"):
        assert k in msg


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("top_p", "0"),
        ("top_p", "-0.1"),
        ("top_p", "1.01"),
        ("eps", "-0.01"),
        ("eps", "1"),
        ("eps", "2"),
        ("threshold", "-0.01"),
        ("threshold", "1.5"),
        ("top_p", "high"),
        ("eps", "true"),
        ("threshold", "null"),
        ("top_p", "[0.9]"),
    ],
)
@pytest.mark.parametrize("level", ["strategy", "model", "model-strategy"])
def test_out_of_range_or_non_numeric_params(tmp_path: Path, key: str, value: str, level: str) -> None:
    text, where = {
        "strategy": (f"strategies:\n  LogTokU: {{{key}: {value}}}\n", f"strategies.LogTokU.{key}"),
        "model": (f"models:\n  m: {{{key}: {value}}}\n", f"models.m.{key}"),
        "model-strategy": (
            f"models:\n  m:\n    strategies:\n      LogTokU: {{{key}: {value}}}\n",
            f"models.m.strategies.LogTokU.{key}",
        ),
    }[level]
    config_error(write(tmp_path, text), where, models=["m"])


@pytest.mark.parametrize("value", ["2.5", "'10'", "0", "-3", "true", "1.0"])
def test_max_new_tokens_must_be_a_positive_integer(tmp_path: Path, value: str) -> None:
    p = write(tmp_path, f"strategies:\n  {ANY}: {{max_new_tokens: {value}}}\n")
    config_error(p, f"strategies.{ANY}.max_new_tokens", "integer")


def test_bad_calibration(tmp_path: Path) -> None:
    config_error(write(tmp_path, "calibration: inductive\n"), "calibration", "inductive", "transductive", "split")
    assert build_config(write(tmp_path, "calibration: split\n", "ok.yaml")).calibration == "split"


def test_unknown_taxonomy(tmp_path: Path) -> None:
    config_error(
        write(tmp_path, "taxonomy: llama_guard_4\n"), "taxonomy", "llama_guard_4", "llama_guard_2", "llama_guard_3"
    )


def test_unknown_model_taxonomy(tmp_path: Path) -> None:
    p = write(tmp_path, "models:\n  m: {taxonomy: nope}\n")
    config_error(p, "models.m.taxonomy", "nope", "llama_guard_3", models=["m"])


def test_model_taxonomy_lacking_dataset_codes(tmp_path: Path) -> None:
    p = write(tmp_path, "taxonomy: llama_guard_3\nmodels:\n  m: {taxonomy: llama_guard_2}\n")
    config_error(p, "models.m.taxonomy", "llama_guard_2", models=["m"])
    # the other way round covers the codes, but Llama Guard 3's S5 is not Llama Guard 2's: refused
    p2 = write(tmp_path, "taxonomy: llama_guard_2\nmodels:\n  m: {taxonomy: llama_guard_3}\n", "no.yaml")
    with pytest.raises(ConfigError, match=r"names other categories than the run's taxonomy llama_guard_2"):
        build_config(p2, models=["m"])
    # a custom run taxonomy that names the model's categories as it does (a final period aside) is fine
    small = "taxonomies:\n  small: [{code: S1, name: Violent Crimes.}, {code: S10, name: hate}]\ntaxonomy: small\n"
    p3 = write(tmp_path, small + "models:\n  m: {taxonomy: llama_guard_3}\n", "ok.yaml")
    cfg = build_config(p3, models=["m"])
    assert cfg.models[0].taxonomy.name == "llama_guard_3" and cfg.taxonomy.codes == ("S1", "S10")


def test_llama_guard_2_taxonomy(tmp_path: Path) -> None:
    cfg = build_config(write(tmp_path, "taxonomy: llama_guard_2\n"))
    assert cfg.taxonomy.codes == tuple(f"S{i}" for i in range(1, 12))
    assert cfg.models[0].taxonomy.name == "llama_guard_2"


CUSTOM = """\
taxonomy: mine
taxonomies:
  mine:
    - {code: A, name: Alpha, description: first}
    - {code: B2, name: Beta}
    - {code: C}
"""


def test_custom_taxonomy(tmp_path: Path) -> None:
    cfg = build_config(write(tmp_path, CUSTOM))
    assert cfg.taxonomy.name == "mine"
    assert cfg.taxonomy.codes == ("A", "B2", "C")
    assert cfg.taxonomy.labels == ("unsafe", "A", "B2", "C")
    assert [c.name for c in cfg.taxonomy.categories] == ["Alpha", "Beta", "C"]
    assert cfg.taxonomy.categories[0].description == "first"
    assert cfg.models[0].taxonomy.codes == ("A", "B2", "C")


def test_custom_taxonomy_defined_but_not_used(tmp_path: Path) -> None:
    cfg = build_config(write(tmp_path, CUSTOM.replace("taxonomy: mine\n", "")))
    assert cfg.taxonomy.name == "llama_guard_3"


@pytest.mark.parametrize(
    "rows",
    [
        "[{code: A}, {code: A}]",  # duplicate
        "[{code: S-1}]",  # not letters/digits
        "[{code: unsafe}]",  # reserved
        "[{code: ''}]",  # empty
        "[{name: no code}]",
        "[{code: A, colour: red}]",  # unknown key
        "[]",
        "{code: A}",
        "[A, B]",
    ],
)
def test_bad_custom_taxonomy(tmp_path: Path, rows: str) -> None:
    config_error(write(tmp_path, f"taxonomy: mine\ntaxonomies:\n  mine: {rows}\n"), "taxonomies.mine")


def test_custom_taxonomy_cannot_shadow_builtin(tmp_path: Path) -> None:
    p = write(tmp_path, "taxonomies:\n  llama_guard_3: [{code: A}]\n")
    config_error(p, "taxonomies.llama_guard_3")


@pytest.mark.parametrize("prompt", ["chat", "llama_guard", "missing_template.yaml"])
def test_bad_model_prompt(tmp_path: Path, prompt: str) -> None:
    p = write(tmp_path, f"models:\n  m: {{prompt: {prompt}}}\n")
    config_error(p, "models.m.prompt", prompt, "guard", "instruct", models=["m"])


def test_bad_top_level_prompt(tmp_path: Path) -> None:
    config_error(write(tmp_path, "prompt: chat\n"), "prompt", "chat", "guard", "instruct")


def test_bad_model_dtype(tmp_path: Path) -> None:
    p = write(tmp_path, "models:\n  m: {dtype: fp8}\n")
    config_error(p, "models.m.dtype", "fp8", "auto", "bf16", "fp32", models=["m"])


@pytest.mark.parametrize("value", ["x", "1.5", "true"])
def test_bad_seed(tmp_path: Path, value: str) -> None:
    config_error(write(tmp_path, f"seed: {value}\n"), "seed")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("strategies: [greedy_generation]\n", "strategies"),
        ("models: [m]\n", "models"),
        ("models:\n  m: 3\n", "models.m"),
        ("taxonomies: [a]\n", "taxonomies"),
        ("strategies:\n  LogTokU: 0.9\n", "strategies.LogTokU"),
        ("models:\n  m: {strategies: [LogTokU]}\n", "models.m.strategies"),
    ],
)
def test_wrong_shapes(tmp_path: Path, text: str, key: str) -> None:
    config_error(write(tmp_path, text), key, "mapping", models=["m"])


# --- validation must not depend on which models/strategies the command selects ---------


def test_strategy_params_validated_even_if_not_chosen(tmp_path: Path) -> None:
    p = write(tmp_path, "strategies:\n  greedy_generation: {}\n  LogTokU: {top_p: 5}\n")
    config_error(p, "strategies.LogTokU.top_p", strategies=["greedy_generation"])


def test_per_model_strategy_params_validated_even_if_not_chosen(tmp_path: Path) -> None:
    """A bad models.<m>.strategies.<s> value must be an error whatever --strategies is (as strategies.<s> is)."""
    p = write(tmp_path, "models:\n  m:\n    strategies:\n      LogTokU: {top_p: 5, top_q: 1}\n")
    config_error(p, "models.m.strategies.LogTokU", models=["m"])  # all strategies chosen: rejected
    config_error(p, "models.m.strategies.LogTokU", models=["m"], strategies=["greedy_generation"])


def test_unselected_model_entries_validated(tmp_path: Path) -> None:
    """`tokmarg validate` (default model only) must still catch a typo in another model's entry."""
    p = write(tmp_path, "models:\n  m: {top_p: 0.9}\n  other: {top_q: 0.9}\n")
    config_error(p, "models.other.top_q", models=["m"])
    config_error(p, "models.other.top_q")


@pytest.mark.parametrize("key", ["answer_prefix", "device"])
@pytest.mark.parametrize("value", ["[a]", "{a: 1}", "null"])
def test_model_string_settings_reject_non_strings(tmp_path: Path, key: str, value: str) -> None:
    """A non-string answer_prefix/device must not become its Python repr (e.g. 'None' or "['a']")."""
    p = write(tmp_path, f"models:\n  m: {{{key}: {value}}}\n")
    if value == "null":  # YAML `answer_prefix:` with no value: the default, or an error; never 'None'
        try:
            m = build_config(p, models=["m"]).models[0]
        except ConfigError as e:
            assert "\n" not in str(e) and f"models.m.{key}" in str(e)
            return
        assert getattr(m, key) == {"answer_prefix": "", "device": "auto"}[key]
        return
    config_error(p, f"models.m.{key}", models=["m"])
