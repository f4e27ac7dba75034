"""What model a worker scored with and what prompt it read, as hashes a later run can compare.

A *model fingerprint* is the sha256 of every file in the model's directory that decides its
outputs (:func:`model_files`: the config, the weights, the tokenizer and its chat template), and
the sha256 over those; a *prompt hash* (:func:`prompt_sha256`) covers the texts and token ids of
fixed probe samples as the model reads them. Calibrated thresholds are only valid for the model
and prompt that produced them: these let a policy file refuse another in one line
(:meth:`ModelFingerprint.differences`).

Hashing reads each file once: a Hugging Face cache blob is named by its content's sha256 (that
name is used), and other files' hashes are kept in ``cache_root()/fingerprints.json``, keyed by
real path, size and mtime.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tokmarg.chat import ModelPrompt, probe_samples
from tokmarg.errors import TokmargError
from tokmarg.models import ModelError, _source, cache_root
from tokmarg.prompts import prompt_ids

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"  # its eos ids end the strategies' paths
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
SAFE_SUFFIX = ".safetensors"
SAFE_INDEX_SUFFIX = ".safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
NOT_WEIGHTS = ("training_args.bin",)  # a trainer's arguments, shipped beside pickled weights
GGUF_SUFFIX = ".gguf"
CHUNK = 1 << 20
CACHE_MIN_BYTES = 1 << 20  # smaller files are hashed directly: faster than reading the cache
_LFS_BLOB = re.compile(r"[0-9a-f]{64}")


def _weight_files(files: list[Path]) -> list[Path]:
    """The weights the loader reads, by its order of preference: safetensors (a sharded index and
    its shards, or every ``*.safetensors``), else pickled weights, else GGUF files. A format the
    loader would not read stays out, so a cache that also holds it does not change the fingerprint."""
    index = [p for p in files if p.name.endswith(SAFE_INDEX_SUFFIX)]
    safe = [p for p in files if p.name.endswith(SAFE_SUFFIX)]
    if index:
        shards: set[str] = set()
        for p in index:
            try:
                shards.update(json.loads(p.read_text(encoding="utf-8")).get("weight_map", {}).values())
            except (OSError, ValueError, AttributeError):
                shards.update(s.name for s in safe)  # unreadable index: every shard, its hash shows it
        return index + [p for p in safe if p.name in shards]
    if safe:
        return safe
    pickles = [p for p in files if p.name.endswith(PICKLE_SUFFIXES) and p.name not in NOT_WEIGHTS]
    return pickles or [p for p in files if p.name.endswith(GGUF_SUFFIX)]


def model_files(source_dir: Path) -> list[Path]:
    """The files of a model directory (top level) that decide its outputs, sorted by name:
    ``config.json``, ``generation_config.json``, the weights (:func:`_weight_files`) and the
    tokenizer files it has."""
    files = sorted((p for p in Path(source_dir).iterdir() if p.is_file()), key=lambda p: p.name)
    named = {CONFIG, GENERATION_CONFIG, *TOKENIZER_FILES}
    chosen = [p for p in files if p.name in named] + _weight_files(files)
    return sorted(chosen, key=lambda p: p.name)


def _read_cache(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}


def _write_cache(path: Path, data: dict[str, str]) -> None:
    """Write atomically (temp file + rename); entries for files that are gone are dropped. Never
    raises: a cache that cannot be written only costs the next load a re-read."""
    live = {k: v for k, v in data.items() if os.path.exists(k.rsplit("|", 2)[0])}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(live, f, indent=0, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """The sha256 of a file's content, read in 1 MiB chunks. A symlink into a Hugging Face cache's
    ``blobs/`` whose target is named by 64 hex characters (an LFS blob, named by its sha256) is not
    read: the name is the hash. Files of 1 MiB or more are cached by ``realpath|size|mtime_ns``."""
    path = Path(path)
    real = path.resolve()
    if path.is_symlink() and real.parent.name == "blobs" and _LFS_BLOB.fullmatch(real.name):
        return real.name
    st = real.stat()
    if st.st_size < CACHE_MIN_BYTES:
        return _hash_file(real)
    cache = cache_root() / "fingerprints.json"
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    known = _read_cache(cache)
    if key in known:
        return known[key]
    sha = _hash_file(real)
    _write_cache(cache, {**_read_cache(cache), key: sha})  # re-read: another worker may have added some
    return sha


def _digest(files: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{name}\t{sha}\n" for name, sha in sorted(files.items())).encode()).hexdigest()


@dataclass(frozen=True)
class ModelFingerprint:
    """The sha256 of each file that decides a model's outputs (by name), and the sha256 over them
    (of the lines ``name<TAB>sha256`` sorted by name)."""

    sha256: str
    files: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, files: dict[str, str]) -> ModelFingerprint:
        return cls(_digest(files), dict(sorted(files.items())))

    def to_dict(self) -> dict:
        return {"sha256": self.sha256, "files": dict(self.files)}

    @classmethod
    def from_dict(cls, d: object) -> ModelFingerprint:
        """Read :meth:`to_dict`'s output; refuses (ValueError, one line) a malformed one or one whose
        ``sha256`` is not that of its ``files``."""
        if not isinstance(d, dict) or not isinstance(d.get("sha256"), str) or not isinstance(d.get("files"), dict):
            raise ValueError("a model fingerprint needs `sha256` (a string) and `files` (file name -> sha256)")
        files = d["files"]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise ValueError("a model fingerprint's `files` must map file names to sha256 strings")
        fp = cls.of(files)
        if fp.sha256 != d["sha256"]:
            raise ValueError(f"a model fingerprint's sha256 {d['sha256']} is not that of its files ({fp.sha256})")
        return fp

    def differences(
        self, other: ModelFingerprint, mine: str = "this model", theirs: str = "the policy's model"
    ) -> list[str]:
        """Short phrases naming how ``other`` differs, file by file (sorted by name), e.g.
        ``model.safetensors differs``, ``config.json only in the policy's model`` (``mine``: this
        fingerprint's model, ``theirs``: ``other``'s); empty when the models' files are the same."""
        out = []
        for name in sorted(set(self.files) | set(other.files)):
            if name not in other.files:
                out.append(f"{name} only in {mine}")
            elif name not in self.files:
                out.append(f"{name} only in {theirs}")
            elif self.files[name] != other.files[name]:
                out.append(f"{name} differs")
        if not out and self.sha256 != other.sha256:
            out.append("the fingerprints' sha256 differ")
        return out


def fingerprint_dir(source_dir: Path) -> ModelFingerprint:
    """The fingerprint of a model directory; refuses (:class:`ModelError`, one line naming it) one
    without ``config.json`` or without weights."""
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise ModelError(f"cannot fingerprint the model in {source_dir}: not a directory")
    files = model_files(source_dir)
    names = {p.name for p in files}
    if CONFIG not in names:
        raise ModelError(f"cannot fingerprint the model in {source_dir}: it has no {CONFIG}")
    if not _weight_files(files):
        raise ModelError(f"cannot fingerprint the model in {source_dir}: it has no weight file")
    return ModelFingerprint.of({p.name: file_sha256(p) for p in files})


def model_source_dir(name: str) -> Path:
    """The directory the model ``name`` is loaded from: a preset's converted directory, a local
    directory itself, or a hub id's snapshot in the local Hugging Face cache."""
    source = Path(_source(name))
    if source.is_dir():
        return source
    from transformers.utils import cached_file

    try:
        config = cached_file(name, CONFIG, local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the cache: ask the hub, as the loader did
        try:
            config = cached_file(name, CONFIG)
        except Exception as e:  # noqa: BLE001 - any lookup failure becomes one clear line
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"cannot find the files of model {name!r}: {msg}") from None
    if config is None:
        raise ModelError(f"cannot find the files of model {name!r}: no {CONFIG}")
    return Path(config).parent


def prompt_sha256(prompt: ModelPrompt) -> str:
    """The sha256 of the probe samples' prompts as the model reads them (their texts, answer prefix
    included, and token ids): another chat template, policy, taxonomy or answer prefix changes it."""
    h = hashlib.sha256()
    for s in probe_samples():
        text = prompt.text(s)
        h.update(json.dumps([s.id, text, list(prompt_ids(prompt.tokenizer, text))]).encode() + b"\n")
    return h.hexdigest()


class IdentityError(TokmargError, ValueError):
    """The loaded model or its rendered prompt is not the one a policy was fitted with; one line."""


def check_identity(model: str, fp: ModelFingerprint, prompt_sha: str, expect: dict, dtype: str = "") -> None:
    """Refuse (:class:`IdentityError`) a model whose files, rendered prompt or weights' precision
    (``dtype``, e.g. ``bfloat16``) differ from ``expect`` (a policy's ``model_sha256``,
    ``model_files``, ``prompt_sha256``, ``dtype`` and ``policy``)."""
    where = expect.get("policy", "the policy")
    want = expect.get("dtype")
    if want and dtype and dtype != want:
        flag = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(want, want)
        raise IdentityError(
            f"model {model!r} loads in {dtype}, but {where} was fitted on its {want} scores: give --dtype {flag}"
        )
    if fp.sha256 != expect["model_sha256"]:
        files = expect.get("model_files") or {}
        diffs = fp.differences(ModelFingerprint.of(files)) if files else []
        what = ", ".join(diffs[:3]) + (f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else "") if diffs else (
            f"files sha256 {fp.sha256[:12]}… vs {expect['model_sha256'][:12]}…"
        )  # fmt: skip
        raise IdentityError(f"model {model!r} is not the model {where} was fitted on: {what}")
    if prompt_sha != expect["prompt_sha256"]:
        raise IdentityError(
            f"model {model!r} reads another prompt than {where} was fitted with (rendered template sha256 "
            f"{prompt_sha[:12]}… vs {expect['prompt_sha256'][:12]}…): check prompt, answer_prefix, taxonomy and "
            "the chat template"
        )
