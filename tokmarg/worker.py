"""One model resident in one process, scoring partitions of the dataset with every strategy.

Ray-free: the local launcher calls :class:`Worker` directly and the Ray launcher wraps it
as an actor at launch. Everything a worker needs travels in :class:`WorkerSpec` and
:class:`Partition` (the prompt template's text included), so a worker on another node
reads no file of the driver's.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from tokmarg.chat import ModelPrompt, probe_samples
from tokmarg.config import Config, ModelConfig
from tokmarg.data import Dataset, Sample
from tokmarg.engine.score import EngineOptions, score
from tokmarg.engine.tree import common_prefix_len
from tokmarg.fingerprint import check_identity, fingerprint_dir, model_source_dir, prompt_sha256
from tokmarg.models import load_model, model_view
from tokmarg.prompts import PromptFormat, load_format
from tokmarg.records import PartitionMeta, PartitionResult
from tokmarg.strategies import Query
from tokmarg.strategies.base import Semantics


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker computes: one model, every strategy, one semantics."""

    model: ModelConfig
    fmt: PromptFormat
    labels: tuple[str, ...]  # "unsafe" + the dataset taxonomy's codes
    strategies: tuple[str, ...]
    semantics: Semantics
    engine: EngineOptions = field(default_factory=EngineOptions)
    trust_remote_code: bool = False
    allow_pickle: bool = False
    threads: int = 0  # torch CPU threads; 0 = leave torch's default
    spread: bool = False  # spread the model over every visible GPU (accelerate device map)
    probes: tuple[Sample, ...] = ()  # one sample per conversation shape: rendered at load time
    expect: dict | None = None  # a policy's model_sha256, model_files, prompt_sha256: refuse another at load

    @classmethod
    def from_config(cls, mc: ModelConfig, cfg: Config, **kw: object) -> WorkerSpec:
        return cls(mc, load_format(mc.prompt), cfg.taxonomy.labels, cfg.strategies, cfg.semantics, **kw)  # type: ignore[arg-type]

    def prompt(self, tokenizer: object) -> ModelPrompt:
        """This model's prompts through its tokenizer's chat template (checked as they render)."""
        mc = self.model
        return ModelPrompt(mc.name, tokenizer, self.fmt, mc.taxonomy, mc.answer_prefix)


@dataclass(frozen=True, eq=False)
class Partition:
    """A slice of the dataset: samples ``start:stop`` in file order, read from the dataset file
    when asked for (and when sent to a Ray actor, which gets them with it)."""

    index: int
    start: int
    stop: int
    has_safe: bool  # the whole dataset has safe rows: forced-prefix strategies decide safe/unsafe first
    dataset: Dataset | None = field(default=None, repr=False)
    loaded: tuple[Sample, ...] | None = field(default=None, repr=False)

    @property
    def samples(self) -> tuple[Sample, ...]:
        if self.loaded is not None or self.dataset is None:
            return self.loaded or ()
        return self.dataset.read(self.start, self.stop)

    def __reduce__(self) -> tuple:  # pickled with its samples, without the dataset
        return (Partition, (self.index, self.start, self.stop, self.has_safe, None, self.samples))


def build_queries(
    prompt: ModelPrompt, labels: tuple[str, ...], samples: Sequence[Sample], has_safe: bool
) -> list[Query]:
    """Each sample's prompt as this model sees it (its prompt format, chat template and taxonomy)."""
    return [Query(s.id, prompt.ids(s), labels, has_safe) for s in samples]


class Worker:
    """Loads the model once; ``run_partition`` scores a partition with every strategy."""

    def __init__(self, spec: WorkerSpec) -> None:
        import torch

        if spec.threads > 0:
            torch.set_num_threads(spec.threads)
        t0 = time.perf_counter()
        mc = spec.model
        self.spec = spec
        self.lm = load_model(
            mc.name,
            mc.device,
            mc.dtype,
            trust_remote_code=spec.trust_remote_code,
            allow_pickle=spec.allow_pickle,
            device_map="auto" if spec.spread else None,
        )
        self.prompt = spec.prompt(self.lm.tokenizer)
        self.prompt.check(spec.probes)  # a conversation the template cannot render: one line, now
        self.fingerprint = fingerprint_dir(model_source_dir(mc.name))  # what a policy file checks
        self.prompt_sha256 = prompt_sha256(self.prompt)
        if spec.expect is not None:
            dtype = str(self.lm.dtype).replace("torch.", "")
            check_identity(mc.name, self.fingerprint, self.prompt_sha256, spec.expect, dtype)
        self.info, self.tokens = model_view(self.lm, spec.labels[1:])
        self.template_prefix = self._template_prefix()
        self.load_seconds = time.perf_counter() - t0

    def _template_prefix(self) -> int:
        """Tokens of the prompt before any sample's own text (two probes that differ at once), so
        the prefix prefilled once per partition, and each sample's token count, do not depend on
        how the dataset was partitioned."""
        return common_prefix_len([self.prompt.ids(s) for s in probe_samples()])

    def describe(self, files: bool = True) -> dict:
        """Where and with what this worker scores: host, device, dtype, the model files' and the
        rendered prompt's hashes, and (with ``files``) each model file's hash."""
        import torch

        return {
            "model": self.spec.model.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(self.lm.device),
            "dtype": str(self.lm.dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(),
            "load_seconds": round(self.load_seconds, 3),
            "model_sha256": self.fingerprint.sha256,
            **({"model_files": dict(self.fingerprint.files)} if files else {}),
            "prompt_sha256": self.prompt_sha256,
        }

    def run_partition(self, part: Partition) -> PartitionResult:
        spec, mc = self.spec, self.spec.model
        queries = build_queries(self.prompt, spec.labels, part.samples, part.has_safe)
        outs, stats = score(
            self.lm,
            self.info,
            self.tokens,
            queries,
            spec.strategies,
            mc.params,
            spec.semantics,
            spec.engine,
            max_prefix=self.template_prefix,
        )
        per_sample = tuple(sum(outs[s][i].tokens_forwarded for s in spec.strategies) for i in range(len(part.samples)))
        meta = PartitionMeta(
            model=mc.name,
            index=part.index,
            seconds=dict(stats.seconds),
            tokens_forwarded=sum(per_sample),
            prefix_tokens=stats.prefix_tokens,
            forward_calls=stats.forward_calls,
            worker=self.describe(files=False),  # the file list once, in the manifest's launch.workers
        )
        return PartitionResult(
            meta,
            tuple(s.id for s in part.samples),
            tuple(s.true_codes for s in part.samples),
            {s: outs[s] for s in spec.strategies},
            per_sample,
        )
