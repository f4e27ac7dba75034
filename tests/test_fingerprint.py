"""Model fingerprints and prompt hashes: stable for the same files and prompt, changed by any change
that changes the model's outputs, cheap on a Hugging Face cache (blob names) and on a second load
(the hash cache), and recorded by every worker."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tokmarg.chat import ModelPrompt
from tokmarg.config import build_config
from tokmarg.fingerprint import (
    ModelFingerprint,
    file_sha256,
    fingerprint_dir,
    model_files,
    model_source_dir,
    prompt_sha256,
)
from tokmarg.models import ModelError
from tokmarg.prompts import load_format
from tokmarg.taxonomy import LLAMA_GUARD_3
from tokmarg.worker import Worker, WorkerSpec


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny model to change."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's hash cache in its own directory (never the user's)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("TOKMARG_CACHE", str(cache))
    return cache


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def flip_byte(path: Path, at: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 1
    path.write_bytes(bytes(data))


def test_fingerprint_is_stable_and_covers_the_model_files(tiny_model_dir: Path, model_copy: Path) -> None:
    fp = fingerprint_dir(tiny_model_dir)
    assert fingerprint_dir(tiny_model_dir) == fp
    assert fingerprint_dir(model_copy) == fp  # the files decide it, not where they are
    assert set(fp.files) == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    }
    for name, sha in fp.files.items():
        assert sha == sha256((tiny_model_dir / name).read_bytes())
    lines = "".join(f"{n}\t{fp.files[n]}\n" for n in sorted(fp.files))
    assert fp.sha256 == sha256(lines.encode())
    assert [p.name for p in model_files(tiny_model_dir)] == sorted(fp.files)
    # files that do not decide the outputs: a readme, a trainer's arguments, pickled weights the
    # loader does not read beside safetensors, a subdirectory
    (model_copy / "README.md").write_text("hello", encoding="utf-8")
    (model_copy / "training_args.bin").write_bytes(b"args")
    (model_copy / "pytorch_model.bin").write_bytes(b"pickled")
    (model_copy / "original").mkdir()
    (model_copy / "original" / "consolidated.00.pth").write_bytes(b"meta's")
    assert fingerprint_dir(model_copy) == fp
    assert ModelFingerprint.from_dict(json.loads(json.dumps(fp.to_dict()))) == fp
    assert fp.differences(fp) == []


def test_changed_weights_config_or_tokenizer_change_the_fingerprint(tiny_model_dir: Path, model_copy: Path) -> None:
    policy = fingerprint_dir(tiny_model_dir)
    flip_byte(model_copy / "model.safetensors")
    now = fingerprint_dir(model_copy)
    assert now.sha256 != policy.sha256
    assert now.differences(policy) == ["model.safetensors differs"]
    shutil.copy2(tiny_model_dir / "model.safetensors", model_copy / "model.safetensors")
    assert fingerprint_dir(model_copy) == policy

    config = json.loads((model_copy / "config.json").read_text(encoding="utf-8"))
    config["rms_norm_eps"] = 1e-3
    (model_copy / "config.json").write_text(json.dumps(config), encoding="utf-8")
    now = fingerprint_dir(model_copy)
    assert now.sha256 != policy.sha256
    assert now.differences(policy) == ["config.json differs"]

    (model_copy / "chat_template.jinja").unlink()
    (model_copy / "tokenizer.model").write_bytes(b"sentencepiece")
    assert fingerprint_dir(model_copy).differences(policy) == [
        "chat_template.jinja only in the policy's model",
        "config.json differs",
        "tokenizer.model only in this model",
    ]


def test_a_directory_without_weights_or_config_is_refused(model_copy: Path) -> None:
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no weight file") as e:
        fingerprint_dir(model_copy)
    assert str(model_copy) in str(e.value) and "\n" not in str(e.value)
    (model_copy / "pytorch_model.bin").write_bytes(b"pickled")  # the loader's other format
    assert set(fingerprint_dir(model_copy).files) >= {"config.json", "pytorch_model.bin"}
    (model_copy / "config.json").unlink()
    with pytest.raises(ModelError, match="no config.json") as e:
        fingerprint_dir(model_copy)
    assert str(model_copy) in str(e.value)


def test_sharded_weights_are_the_index_and_its_shards(model_copy: Path) -> None:
    (model_copy / "model.safetensors").rename(model_copy / "model-00001-of-00001.safetensors")
    weight_map = {"weight_map": {"lm_head.weight": "model-00001-of-00001.safetensors"}}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(weight_map), encoding="utf-8")
    (model_copy / "consolidated.safetensors").write_bytes(b"another layout, not loaded")
    files = fingerprint_dir(model_copy).files
    assert "model-00001-of-00001.safetensors" in files and "model.safetensors.index.json" in files
    assert "consolidated.safetensors" not in files


def test_from_dict_refuses_a_fingerprint_that_does_not_add_up(tiny_model_dir: Path) -> None:
    d = fingerprint_dir(tiny_model_dir).to_dict()
    d["files"]["config.json"] = "0" * 64
    with pytest.raises(ValueError, match="not that of its files"):
        ModelFingerprint.from_dict(d)
    with pytest.raises(ValueError, match="needs `sha256`"):
        ModelFingerprint.from_dict({"files": {}})


def _hf_cache(root: Path, repo: str, source: Path) -> Path:
    """``source``'s files laid out as the Hugging Face cache does: ``snapshots/<rev>/<file>`` links
    to ``blobs/<name>``, an LFS file's blob named by its sha256, another's by a git sha1."""
    top = root / f"models--{repo.replace('/', '--')}"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (top / "blobs").mkdir(parents=True)
    (top / "refs").mkdir()
    (top / "refs" / "main").write_text(rev, encoding="utf-8")
    snap = top / "snapshots" / rev
    snap.mkdir(parents=True)
    for p in source.iterdir():
        data = p.read_bytes()
        blob = sha256(data) if p.suffix == ".safetensors" else hashlib.sha1(data).hexdigest()
        (top / "blobs" / blob).write_bytes(data)
        (snap / p.name).symlink_to(Path("..", "..", "blobs", blob))
    return snap


def test_a_hugging_face_lfs_blob_is_not_read(tmp_path: Path) -> None:
    named = "ab" * 32
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / named).write_bytes(b"content whose sha256 is not the name")  # proves the name is used
    (blobs / ("cd" * 20)).write_bytes(b"a git blob")  # 40 hex: a git sha1, read
    snap = tmp_path / "snapshots" / "x"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(Path("..", "..", "blobs", named))
    (snap / "config.json").symlink_to(Path("..", "..", "blobs", "cd" * 20))
    assert file_sha256(snap / "model.safetensors") == named
    assert file_sha256(snap / "config.json") == sha256(b"a git blob")
    assert file_sha256(blobs / named) == sha256(b"content whose sha256 is not the name")  # not a link: read


def test_a_hub_id_fingerprints_its_snapshot_in_the_hf_cache(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    snap = _hf_cache(tmp_path / "hub", "acme/tiny-guard", tiny_model_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert model_source_dir("acme/tiny-guard") == snap
    assert fingerprint_dir(snap) == fingerprint_dir(tiny_model_dir)  # blob names and contents agree
    assert model_source_dir(str(tiny_model_dir)) == tiny_model_dir
    with pytest.raises(ModelError, match="unknown model"):
        model_source_dir("no-such-model")


def test_the_hash_cache_is_used_and_never_breaks_a_load(tmp_path: Path, own_cache: Path) -> None:
    big = tmp_path / "weights.safetensors"
    data = os.urandom(2 << 20)  # cached from 1 MiB
    big.write_bytes(data)
    sha = file_sha256(big)
    assert sha == sha256(data)
    entries = json.loads((own_cache / "fingerprints.json").read_text(encoding="utf-8"))
    st = big.stat()
    assert entries == {f"{big.resolve()}|{st.st_size}|{st.st_mtime_ns}": sha}
    # same size and mtime, other bytes: the cached hash answers (the file is not read again)
    flip_byte(big, 0)
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_sha256(big) == sha
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched: read again
    assert file_sha256(big) == sha256(big.read_bytes()) != sha
    (own_cache / "fingerprints.json").write_text("{not json", encoding="utf-8")
    assert file_sha256(big) == sha256(big.read_bytes())
    json.loads((own_cache / "fingerprints.json").read_text(encoding="utf-8"))  # rewritten whole


def test_an_unwritable_cache_only_costs_a_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("", encoding="utf-8")
    monkeypatch.setenv("TOKMARG_CACHE", str(blocker / "cache"))  # under a file: cannot be made
    big = tmp_path / "w.bin"
    big.write_bytes(b"x" * (2 << 20))
    assert file_sha256(big) == sha256(big.read_bytes())


def test_prompt_hash_follows_what_the_model_reads(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    instruct = load_format("instruct")

    def h(taxonomy=LLAMA_GUARD_3, prefix: str = "", fmt=instruct, tokenizer=tok) -> str:
        return prompt_sha256(ModelPrompt("m", tokenizer, fmt, taxonomy, prefix))

    base = h()
    assert h() == base
    assert h(prefix="\n\n") != base
    assert h(taxonomy=LLAMA_GUARD_3.without(["S14"])) != base
    assert h(fmt=load_format("guard")) != base
    other = AutoTokenizer.from_pretrained(tiny_model_dir)
    other.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert h(tokenizer=other) != base


def test_a_worker_records_its_model_and_prompt(tiny_model_dir: Path, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("strategies:\n  token_probability: {max_new_tokens: 2}\n", encoding="utf-8")
    cfg = build_config(params, [str(tiny_model_dir)], device="cpu")
    w = Worker(WorkerSpec.from_config(cfg.models[0], cfg))
    d = w.describe()
    fp = fingerprint_dir(tiny_model_dir)
    assert d["model_sha256"] == fp.sha256
    assert d["model_files"] == fp.files
    assert d["prompt_sha256"] == prompt_sha256(w.prompt)
    json.dumps(d)  # goes into each partition's metadata
