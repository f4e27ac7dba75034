"""Models built from a config, for tests, benchmarks and the GPU check: nothing from a hub.

* :func:`llama3_tokenizer`: Meta's Llama 3 tokenizer (the vocabulary of Llama Guard 3 and
  Llama 3.1: 128,000 BPE ranks + 256 special tokens = 128,256 ids, ``<|eot_id|>`` = 128009),
  converted from the ``tokenizer.model`` that the PyPI package ``llama-models`` ships (needs
  ``tiktoken``), with a Llama-3-style chat template. ``unsafe`` is one token there, and
  ``unsafe\\nS1,S14`` is ``unsafe``, ``\\n``, ``S``, ``1``, ``,S``, ``14``.
* :func:`build_random_llama`: a ``LlamaForCausalLM`` with random weights at a named shape
  (``tiny`` or ``llama-3.1-8b``) and that tokenizer, saved as a local model directory. Its
  lm_head is scaled so the next-token distributions are as peaked as a guard model's (at the
  default ``logit_std`` the nucleus at top_p 0.99 has a median of about 2 tokens).

``python -m tokmarg.synthetic OUT_DIR [--shape tiny] [--logit-std 19.2]`` writes such a model;
``python -m tokmarg.synthetic run OUT --samples N --models K [--seed S]`` a finished run of that
size without a model (:mod:`tokmarg.scalerun`), the scale benchmark of the reduce and the report.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import re
import sys
from pathlib import Path

from tokmarg.errors import TokmargError

LLAMA3_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
)
# The Llama 3 chat format (header, blank line, content, <|eot_id|>), without 3.1's tool and date preamble.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# Named shapes (LlamaConfig keyword arguments besides the vocabulary).
SHAPES: dict[str, dict] = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "llama-3.1-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
    },
}
INIT_STD = 0.02  # LlamaConfig's initializer_range
DEFAULT_LOGIT_STD = 19.2  # x120 on the tiny shape's head: nucleus median ~2 tokens at top_p 0.99


class SyntheticError(TokmargError, RuntimeError):
    """A synthetic model cannot be built (a missing package); one line saying what to install."""


# The Llama 4 chat format: <|header_start|>role<|header_end|>, blank line, content, <|eot|>.
LLAMA4_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|header_start|>{{ m['role'] }}<|header_end|>\n\n"
    "{{ m['content'] | trim }}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}"
)


def _llama_models_dir(generation: str) -> Path:
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise SyntheticError(
            f"the Llama {generation[-1]} tokenizer needs the package llama-models: pip install --no-deps llama-models"
        )
    return Path(list(spec.submodule_search_locations)[0]) / generation


def _specials(generation: str) -> tuple[list[str], str, str, str]:
    """(special tokens after the ranks, in id order; eos; pad; the split pattern) of a generation."""
    src = _llama_models_dir(generation)
    if generation == "llama3":
        pattern = re.search(r'pat_str = r"(.*)"', (src / "tokenizer.py").read_text(encoding="utf-8"))
        if pattern is None:
            raise SyntheticError(f"{src / 'tokenizer.py'}: no pat_str found (an unexpected llama-models version)")
        reserved = (f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIALS)))
        return [*LLAMA3_SPECIALS, *reserved], "<|eot_id|>", "<|finetune_right_pad_id|>", pattern.group(1)
    from llama_models.llama4 import tokenizer as meta  # its module lists the special tokens and the pattern

    named = [*meta.BASIC_SPECIAL_TOKENS, *meta.LLAMA4_SPECIAL_TOKENS]
    n = meta.Tokenizer.num_reserved_special_tokens
    reserved = (f"<|reserved_special_token_{i}|>" for i in range(n - len(named)))
    return [*named, *reserved], "<|eot|>", "<|finetune_right_pad|>", meta.Tokenizer.O200K_PATTERN


def _convert(generation: str, out: Path) -> None:
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    if importlib.util.find_spec("tiktoken") is None:
        raise SyntheticError(f"converting the Llama {generation[-1]} tokenizer needs tiktoken: pip install tiktoken")
    specials, eos, pad, pattern = _specials(generation)
    model_file = _llama_models_dir(generation) / "tokenizer.model"
    tok = TikTokenConverter(vocab_file=str(model_file), pattern=pattern).converted()
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token=eos,
        pad_token=pad,
        clean_up_tokenization_spaces=generation == "llama3",  # as Meta's own tokenizer_config.json says
    )
    fast.chat_template = LLAMA3_CHAT_TEMPLATE if generation == "llama3" else LLAMA4_CHAT_TEMPLATE
    fast.save_pretrained(out)


def _tokenizer_dir(generation: str, cache: Path | None) -> Path:
    from tokmarg.models import cache_root, publish_dir

    model_file = _llama_models_dir(generation) / "tokenizer.model"
    template = LLAMA3_CHAT_TEMPLATE if generation == "llama3" else LLAMA4_CHAT_TEMPLATE
    key = hashlib.sha256(f"{model_file.stat().st_size}:{template}".encode()).hexdigest()[:12]
    target = (cache or cache_root()) / "tokenizers" / f"{generation}-{key}"
    if (target / "tokenizer.json").is_file():
        return target
    return publish_dir(target, "tokenizer.json", lambda tmp: _convert(generation, tmp))


def llama3_tokenizer_dir(cache: Path | None = None) -> Path:
    """A directory holding the converted Llama 3 tokenizer (converted once, ~3 s, then cached)."""
    return _tokenizer_dir("llama3", cache)


def llama4_tokenizer_dir(cache: Path | None = None) -> Path:
    """A directory holding Meta's converted Llama 4 tokenizer: 200,000 ranks + 2,048 special tokens
    (202,048 ids; ``<|begin_of_text|>`` 200000, ``<|eot|>`` its end of turn), converted once, then cached."""
    return _tokenizer_dir("llama4", cache)


def llama3_tokenizer(cache: Path | None = None):  # noqa: ANN201 - a transformers tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama3_tokenizer_dir(cache))


def random_llama(  # noqa: ANN201 - a LlamaForCausalLM
    tokenizer: object, shape: str = "tiny", logit_std: float = DEFAULT_LOGIT_STD, seed: int = 0, device: str = "cpu"
):
    """A ``LlamaForCausalLM`` at a named shape with random float32 weights, built on ``device``.

    The lm_head is multiplied so that a logit's standard deviation is about ``logit_std``
    (the final norm gives unit-RMS hidden states; each head row has std ``INIT_STD``).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape not in SHAPES:
        raise SyntheticError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    dims = SHAPES[shape]
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),  # type: ignore[arg-type]
        max_position_embeddings=8192,
        bos_token_id=tokenizer.bos_token_id,  # type: ignore[attr-defined]
        eos_token_id=tokenizer.eos_token_id,  # type: ignore[attr-defined]
        pad_token_id=tokenizer.pad_token_id,  # type: ignore[attr-defined]
        tie_word_embeddings=False,
        initializer_range=INIT_STD,
        **dims,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_std / (INIT_STD * dims["hidden_size"] ** 0.5))
    return model.eval()


def build_random_llama(
    out: Path,
    shape: str = "tiny",
    logit_std: float = DEFAULT_LOGIT_STD,
    seed: int = 0,
    tokenizer_dir: Path | None = None,
) -> Path:
    """Save :func:`random_llama` with the Llama 3 tokenizer as a local model directory."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir or llama3_tokenizer_dir())
    model = random_llama(tok, shape, logit_std, seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def random_multimodal(  # noqa: ANN201 - a transformers model
    kind: str,
    tokenizer: object,
    shape: str = "tiny",
    logit_std: float = DEFAULT_LOGIT_STD,
    seed: int = 0,
    text_only: bool = False,
    device: str = "cpu",
):
    """A guard-shaped multimodal model with random float32 weights: ``llama4`` is Llama Guard 4's class
    (``Llama4ForConditionalGeneration``: a dense Llama 4 text model with QK norm, every 4th layer
    without RoPE and with attention temperature tuning, chunked attention on the others) and
    ``mllama`` Llama Guard 3 11B-Vision's (``MllamaForConditionalGeneration``: cross-attention
    layers that a text-only prompt skips). A small vision tower rides along (unused by text).
    ``text_only``: the causal LM that ``AutoModelForCausalLM`` loads from such a checkpoint
    (``Llama4ForCausalLM``, ``MllamaForCausalLM``), built on ``device``."""
    import torch
    import transformers as tf

    if shape not in SHAPES:
        raise SyntheticError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    dims = {k: v for k, v in SHAPES[shape].items() if k not in ("rope_theta",)}
    ids = {
        "vocab_size": len(tokenizer),  # type: ignore[arg-type]
        "bos_token_id": tokenizer.bos_token_id,  # type: ignore[attr-defined]
        "eos_token_id": tokenizer.eos_token_id,  # type: ignore[attr-defined]
        "pad_token_id": tokenizer.pad_token_id,  # type: ignore[attr-defined]
        "max_position_embeddings": 8192,
    }
    if kind == "llama4":
        dims["num_hidden_layers"] = max(4, dims["num_hidden_layers"])  # at least one layer without RoPE
    layers = dims["num_hidden_layers"]
    if kind == "llama4":
        head_dim = dims["hidden_size"] // dims["num_attention_heads"]
        text = tf.Llama4TextConfig(
            **ids,
            **dims,
            head_dim=head_dim,
            intermediate_size_mlp=dims["intermediate_size"],
            moe_layers=[],  # dense, as Llama Guard 4
            no_rope_layers=[int((i + 1) % 4 != 0) for i in range(layers)],  # 1: RoPE; every 4th without
            attention_chunk_size=8192,
            # a small floor scale, so that the temperature of the layers without RoPE varies within
            # short prompts and the engine's handling of it is exercised (Llama 4's 8,192 leaves it
            # 1 below 8,191 tokens, where its chunked layers stop the fast engine anyway)
            floor_scale=4,
        )
        vision = tf.Llama4VisionConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=56,
            patch_size=14, vision_output_dim=64, projector_input_dim=64, projector_output_dim=64,
        )  # fmt: skip
        cls, cfg = tf.Llama4ForConditionalGeneration, tf.Llama4Config(text_config=text, vision_config=vision)
        if text_only:
            cls, cfg = tf.Llama4ForCausalLM, text
    elif kind == "mllama":
        text = tf.MllamaTextConfig(**ids, **dims, cross_attention_layers=list(range(1, layers, 4)))
        vision = tf.MllamaVisionConfig(
            hidden_size=32, num_hidden_layers=2, num_global_layers=1, num_attention_heads=2, intermediate_size=64,
            image_size=56, patch_size=14, vision_output_dim=64, intermediate_layers_indices=[0],
        )  # fmt: skip
        cls, cfg = tf.MllamaForConditionalGeneration, tf.MllamaConfig(text_config=text, vision_config=vision)
        if text_only:
            cls, cfg = tf.MllamaForCausalLM, text
    else:
        raise SyntheticError(f"unknown multimodal kind {kind!r}; known: llama4, mllama")
    cfg.tie_word_embeddings = False
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(cfg)
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.normal_(0.0, INIT_STD).mul_(logit_std / (INIT_STD * dims["hidden_size"] ** 0.5))
    return model.eval()


def _run_main(argv: list[str]) -> None:
    from tokmarg.scalerun import write_run

    ap = argparse.ArgumentParser(prog="python -m tokmarg.synthetic run", description=write_run.__doc__)
    ap.add_argument("out", type=Path, help="run directory to write (new or empty)")
    ap.add_argument("--samples", type=int, required=True)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--partitions-per-file", type=int, default=None, help="1: the layout older versions read")
    args = ap.parse_args(argv)
    try:
        print(write_run(args.out, args.samples, args.models, args.seed, args.partitions_per_file))
    except TokmargError as e:
        raise SystemExit(f"error: {e}") from None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        return _run_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m tokmarg.synthetic", description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="model directory to write")
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--logit-std", type=float, default=DEFAULT_LOGIT_STD)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        path = build_random_llama(args.out, args.shape, args.logit_std, args.seed)
    except SyntheticError as e:
        raise SystemExit(f"error: {e}") from None
    print(path)


if __name__ == "__main__":
    main()
