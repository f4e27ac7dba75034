"""Model loading and tokenizer facts on tiny local models (tier b)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tokmarg.models import ModelError, load_model, model_tokens, resolve_device, resolve_dtype, token_info
from tokmarg.taxonomy import LLAMA_GUARD_3


def test_local_dir_loads_and_forwards(tiny_model_dir: Path) -> None:
    lm = load_model(str(tiny_model_dir), "cpu", "fp32")
    logits = lm.forward([1, 5, 6])
    assert logits.shape == (lm.model.config.vocab_size,) and logits.dtype == torch.float32
    # a full forward of the same ids gives the same logits (no hidden state between calls)
    assert torch.equal(logits, lm.forward([1, 5, 6]))


def test_device_map_load_gives_the_same_logits(tiny_model_dir: Path) -> None:
    """The multi-GPU actor's path (accelerate device map); here every layer lands on the CPU."""
    plain = load_model(str(tiny_model_dir), "cpu", "fp32")
    mapped = load_model(str(tiny_model_dir), "cpu", "fp32", device_map="auto")
    assert mapped.device == mapped.model.get_input_embeddings().weight.device
    assert torch.allclose(plain.forward([1, 5, 6]), mapped.forward([1, 5, 6]), atol=1e-6)


def test_pickle_checkpoint_refused_unless_allowed(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    (pickled / "model.safetensors").unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")  # a pickle checkpoint
    assert (pickled / "pytorch_model.bin").is_file()
    with pytest.raises(ModelError, match="cannot load model") as e:
        load_model(str(pickled), "cpu")
    assert "\n" not in str(e.value)
    lm = load_model(str(pickled), "cpu", allow_pickle=True)
    assert lm.forward([1, 2]).shape[0] == model.config.vocab_size


def test_unknown_names_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        load_model("nope")
    with pytest.raises(ModelError, match="empty"):
        (tmp_path / "empty").mkdir()
        load_model(str(tmp_path / "empty"))


def test_device_and_dtype_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda:0")) == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ModelError, match="allowed"):
        resolve_dtype("fp8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA GPU"):
            resolve_device("cuda:0")
        assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_placement(tiny_model_dir: Path) -> None:
    lm = load_model(str(tiny_model_dir), "cuda:0", "auto")
    assert next(lm.model.parameters()).device.type == "cuda" and lm.dtype == torch.bfloat16
    assert lm.forward([1, 2, 3]).dtype == torch.float32  # probabilities are computed in float32


def _sentencepiece_like() -> object:
    """A Metaspace (``▁``) tokenizer, as Llama 2 / Mistral use: a lone decode drops the space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {
        "<unk>": 0,
        "</s>": 1,
        "▁S": 2,
        "S": 3,
        "1": 4,
        "4": 5,
        ",": 6,
        "▁unsafe": 7,
        "unsafe": 8,
        "\n": 9,
        "▁a": 10,
        "a": 11,
        "▁": 12,
        "▁safe": 13,
        "safe": 14,
    }
    tok = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", continuing_subword_prefix=""))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def test_token_texts_keep_sentencepiece_spaces() -> None:
    tok = _sentencepiece_like()
    info = token_info(tok, frozenset({1}), len(tok))
    assert tok.decode([2]) == "S"  # the lone decode loses the space...
    assert info.token_texts[2] == " S"  # ...the in-context text keeps it
    assert info.token_texts[1] == "" and bool(info.boundary[1])  # EOS ends a word
    assert bool(info.boundary[2]) and not bool(info.boundary[4]) and bool(info.boundary[6])


def test_model_tokens_digit_split(trained_tiny_dir: Path) -> None:
    lm = load_model(str(trained_tiny_dir), "cpu")
    toks = model_tokens(lm.tokenizer, LLAMA_GUARD_3.codes, "tiny")
    decode = lm.tokenizer.decode
    assert decode(list(toks.forced_prefix)) == "unsafe\nS"
    for code in LLAMA_GUARD_3.codes:  # prefix + rest spells the code, whatever the split
        assert decode([*toks.forced_prefix, *toks.code_rest[code]]) == "unsafe\n" + code
    assert decode(list(toks.verdict_ids["unsafe"])) == "unsafe" and decode(list(toks.verdict_ids["safe"])) == "safe"
