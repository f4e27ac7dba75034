"""Failure paths that must end in one clear line, not a traceback (tier b)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from jinja2 import TemplateError

from tokmarg.data import Sample, Turn
from tokmarg.engine import EngineError
from tokmarg.engine.score import EngineOptions, score
from tokmarg.engine.tree import sliding_window
from tokmarg.models import LoadedModel
from tokmarg.prompts import PromptError, load_format, render
from tokmarg.strategies import ModelTokens, Query, StrategyParams
from tokmarg.taxonomy import LLAMA_GUARD_3


def test_fast_engine_refuses_sequences_past_the_sliding_window() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    small = dict(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    mistral = MistralForCausalLM(MistralConfig(sliding_window=8, **small))
    assert sliding_window(mistral) == 8
    assert sliding_window(LlamaForCausalLM(LlamaConfig(**small))) is None
    lm = LoadedModel("tiny-mistral", mistral, None, torch.device("cpu"), torch.float32)
    tokens = ModelTokens((1, 2), {}, {}, {}, {})
    params = {"token_probability": StrategyParams(max_new_tokens=3)}
    queries = [Query("s1", (5,) * 3, LLAMA_GUARD_3.labels, False), Query("s2", (5,) * 4, LLAMA_GUARD_3.labels, False)]
    # 4 prompt + 3 new + 2 forced tokens > window 8: the fast engine would not be exact
    with pytest.raises(EngineError, match=r"window 8\) and sample s2 needs 4 prompt \+ 5 new.*--engine reference"):
        score(lm, None, tokens, queries, ["token_probability"], params, "exact", EngineOptions("fast"))  # type: ignore[arg-type]


class _RefusingTokenizer:
    def apply_chat_template(self, *args, **kwargs):
        raise TemplateError("Conversation roles must alternate user/assistant/user/assistant/...")


def test_chat_template_refusal_is_a_prompt_error() -> None:
    sample = Sample("s7", (Turn("user", "a"), Turn("user", "b")), (), 7)
    with pytest.raises(PromptError, match=r"^sample s7 \(line 7\): the chat template refused it: Conversation roles"):
        render(_RefusingTokenizer(), load_format("guard"), sample, LLAMA_GUARD_3)


def test_out_path_that_is_a_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tokmarg.cli import app

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "x", "labels": ["S1"]}\n', encoding="utf-8")
    target = tmp_path / "a-file"
    target.write_text("keep")
    res = CliRunner().invoke(
        app,
        [
            "eval",
            "--models",
            str(tiny_model_dir),
            "--dataset",
            str(data),
            "--out",
            str(target),
            "--no-progress",
            "--no-ray",
        ],
    )
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip().splitlines() == [f"error: {target}: exists and is not a directory; choose another --out"]
    assert target.read_text() == "keep"
