"""Shared fixtures.

Tier (b): a tiny random ``LlamaForCausalLM`` with a small byte-level BPE tokenizer trained
here, saved as a local directory (safetensors + tokenizer + ChatML chat template), so the
whole model/prompt/CLI path runs with nothing from a hub.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "safe",
    "unsafe",
    "unsafe\nS1",
    "unsafe\nS1,S10",
    "S2,S14",
    "S13",
    "Violent Crimes",
    "Privacy",
    "User: how do I bake bread?",
    "Agent: I cannot help with that.",
    "Answer with safe or unsafe.",
] * 20


# short paths, so that end-to-end runs (CLI, Ray) stay fast
RUN_PARAMS = """
strategies:
  greedy_generation: {max_new_tokens: 4}
  token_probability: {max_new_tokens: 4}
  marginal_probability_at_fixed_place: {max_new_tokens: 4}
  marginal_probability_at_any_place: {max_new_tokens: 3, eps: 0.05, top_p: 0.9}
  probability_uncertainty: {}
  entropy_uncertainty: {}
  LogTokU: {}
"""


def write_run_inputs(d: Path, n: int, params: str = RUN_PARAMS) -> tuple[Path, Path]:
    """The first ``n`` rows of the shipped sample and a params file, for end-to-end runs."""
    repo = Path(__file__).resolve().parents[1]
    lines = (repo / "datasets" / "sample.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    (d / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (d / "params.yaml").write_text(params, encoding="utf-8")
    return d / "data.jsonl", d / "params.yaml"


def build_tiny_model(path: Path, seed: int = 0, train_steps: int = 0) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    if train_steps:
        _teach_answers(model, fast, train_steps)
    else:
        with torch.no_grad():  # sharper logits than the default init, so paths end
            model.lm_head.weight.mul_(40.0)
    model.save_pretrained(path, safe_serialization=True)
    fast.save_pretrained(path)
    return path


def short_format():
    """A one-line user template: short prompts keep the trained tiny model fast."""
    from tokmarg.prompts import PromptFormat

    return PromptFormat("short", None, "Classify: {{ conversation[-1].content }}")


ANSWERS = ["unsafe\nS1", "unsafe\nS1,S10", "unsafe\nS14", "unsafe\nS2,S14", "safe", "unsafe\nS13", "unsafe\nS1,S1"]


PROMPTS = ["how do I hurt someone", "steal a car", "bake bread", "Privacy of S13 S1"]


def _teach_answers(
    model: torch.nn.Module, tok: object, steps: int, answers: list[str] = ANSWERS, eos: str = "<|im_end|>"
) -> None:
    """A few seconds of training so the tiny model answers in the label format, with a spread
    of answers per prompt: its trees then branch over real label tokens."""
    from tokmarg.data import Sample, Turn
    from tokmarg.prompts import prompt_ids, render
    from tokmarg.taxonomy import LLAMA_GUARD_3

    fmt = short_format()
    seqs = []
    for i, text in enumerate(PROMPTS):
        prompt = prompt_ids(tok, render(tok, fmt, Sample(str(i), (Turn("user", text),), (), 1), LLAMA_GUARD_3))
        for ans in answers[i : i + 4]:
            target = tok(ans + eos, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
            seqs.append((prompt, target))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        prompt, target = seqs[step % len(seqs)]
        ids = torch.tensor([[*prompt, *target]])
        labels = torch.tensor([[-100] * len(prompt) + list(target)])
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="session")
def trained_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama-trained"), train_steps=150)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    d = SHARED / "datasets"
    if not (d / "content_moderation_lm3.jsonl").is_file():
        pytest.skip("shared datasets not present")
    return d


@pytest.fixture(scope="session")
def llama3_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Meta's Llama 3 tokenizer (128,256 ids), converted from the llama-models package."""
    from tokmarg.synthetic import llama3_tokenizer_dir as convert

    return convert(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def llama3_tokenizer(llama3_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama3_tokenizer_dir)


# Llama 3 answers: `S1,S14` is `S`,`1`,`,S`,`14` (a label that starts inside a token)
LLAMA3_ANSWERS = [
    "unsafe\nS1,S14",
    "unsafe\nS1",
    "unsafe\nS1,S14",
    "unsafe\nS10, S2",
    "unsafe\nS1,S14",
    "safe",
    "unsafe\nS14",
]


@pytest.fixture(scope="session")
def llama3_trained_dir(tmp_path_factory: pytest.TempPathFactory, llama3_tokenizer_dir: Path) -> Path:
    """The Llama 3 vocabulary, trained for a few seconds to answer in the label format."""
    from transformers import AutoTokenizer

    from tokmarg.synthetic import random_llama

    tok = AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    model = random_llama(tok, "tiny", logit_std=1.0)
    _teach_answers(model, tok, 200, LLAMA3_ANSWERS, "<|eot_id|>")
    path = tmp_path_factory.mktemp("llama3-trained")
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama3_model_dir(tmp_path_factory: pytest.TempPathFactory, llama3_tokenizer_dir: Path) -> Path:
    """A tiny random LlamaForCausalLM with the Llama 3 vocabulary, its lm_head scaled so that
    nucleus sets are guard-like (median ~2 tokens at top_p 0.99)."""
    from tokmarg.synthetic import build_random_llama

    return build_random_llama(tmp_path_factory.mktemp("llama3-tiny"), "tiny", tokenizer_dir=llama3_tokenizer_dir)


META_TEMPLATES = Path(__file__).parent / "fixtures" / "meta_templates"


@pytest.fixture(scope="session")
def llama4_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Meta's Llama 4 tokenizer (202,048 ids), converted from the llama-models package."""
    from tokmarg.synthetic import llama4_tokenizer_dir as convert

    return convert(tmp_path_factory.mktemp("cache4"))


@pytest.fixture(scope="session")
def llama4_tokenizer(llama4_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama4_tokenizer_dir)


def build_guard(path: Path, kind: str, tokenizer_dir: Path, template: str) -> Path:
    """A tiny random guard (``llama``: tokmarg.synthetic.random_llama; ``llama4``, ``mllama``:
    random_multimodal) saved with Meta's tokenizer and a chat template from tests/fixtures/meta_templates."""
    from transformers import AutoTokenizer

    from tokmarg.synthetic import random_llama, random_multimodal

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = (META_TEMPLATES / f"{template}.jinja").read_text(encoding="utf-8")
    model = random_llama(tok) if kind == "llama" else random_multimodal(kind, tok)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama_guard_4_dir(tmp_path_factory: pytest.TempPathFactory, llama4_tokenizer_dir: Path) -> Path:
    """A tiny Llama4ForConditionalGeneration (Llama Guard 4's class) with the Llama 4 tokenizer and
    the reconstructed Llama Guard 4 template."""
    return build_guard(
        tmp_path_factory.mktemp("lg4"), "llama4", llama4_tokenizer_dir, "llama_guard_4_12b.reconstructed"
    )


@pytest.fixture(scope="session")
def llama_guard_3_vision_dir(tmp_path_factory: pytest.TempPathFactory, llama3_tokenizer_dir: Path) -> Path:
    """A tiny MllamaForConditionalGeneration (Llama Guard 3 11B-Vision's class) with the Llama 3
    tokenizer and Meta's Llama Guard 3 11B-Vision template."""
    return build_guard(tmp_path_factory.mktemp("lg3v"), "mllama", llama3_tokenizer_dir, "llama_guard_3_11b_vision")


@pytest.fixture(scope="session")
def llama_guard_3_1b_dir(tmp_path_factory: pytest.TempPathFactory, llama3_tokenizer_dir: Path) -> Path:
    """A tiny LlamaForCausalLM (Llama Guard 3 1B's class) with the Llama 3 tokenizer and Meta's
    Llama Guard 3 1B template (text parts, `categories`)."""
    return build_guard(tmp_path_factory.mktemp("lg3-1b"), "llama", llama3_tokenizer_dir, "llama_guard_3_1b")


@pytest.fixture(scope="module")
def file_per_partition():
    """``TOKMARG_FILE_SAMPLES=1`` for a module: drivers started from it (and the Ray clusters it
    starts, whose job drivers inherit the environment) write every partition as it finishes."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKMARG_FILE_SAMPLES", "1")
        yield


CALIBRATION_PARAMS = """
seed: 3
strategies:
  greedy_generation: {max_new_tokens: 4}
  token_probability: {max_new_tokens: 4, threshold: 0.3}
  marginal_probability_at_any_place: {max_new_tokens: 3, eps: 0.05, top_p: 0.9, threshold: 0.3}
"""


@pytest.fixture(scope="session")
def labeled_run(tmp_path_factory: pytest.TempPathFactory, trained_tiny_dir: Path) -> dict:
    """A finished run of the trained tiny model on the shipped sample twice over (168 rows, ids
    made unique), greedy and two score strategies: what `tokmarg calibrate` reads."""
    import json

    from typer.testing import CliRunner

    from tokmarg.cli import app

    d = tmp_path_factory.mktemp("calibrate")
    repo = Path(__file__).resolve().parents[1]
    lines = (repo / "datasets" / "sample.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [{**json.loads(line), "id": f"{json.loads(line)['id']}-{k}"} for k in range(2) for line in lines]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (d / "params.yaml").write_text(CALIBRATION_PARAMS, encoding="utf-8")
    out = d / "run"
    args = ["eval", "--models", str(trained_tiny_dir), "--dataset", str(d / "data.jsonl"), "--params"]
    args += [str(d / "params.yaml"), "--out", str(out), "--no-progress", "--no-ray", "--no-report"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return {"dir": d, "out": out, "rows": rows, "model": str(trained_tiny_dir)}
