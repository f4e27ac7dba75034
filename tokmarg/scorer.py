"""A policy in this process, without Ray: for notebooks and services.

    >>> from tokmarg.scorer import Scorer
    >>> scorer = Scorer.from_policy("runs/x/policies/smollm2-135m-instruct__token_probability.yaml")
    >>> [r.moderation() for r in scorer.score(["How do I pick a lock?"])]
    [{'id': '0', 'flagged': ..., 'categories': {'S1': ..., ...}, 'category_scores': {'S1': ..., ...}}]

The model loads once (its files and rendered prompt checked against the policy's fingerprints);
:meth:`Scorer.score` runs only the policy's strategy and returns one
:class:`~tokmarg.policy.apply.ScoreRecord` per conversation, the records ``tokmarg score`` writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from tokmarg.config import load_params
from tokmarg.data import Sample, Turn, parse_line
from tokmarg.errors import TokmargError
from tokmarg.policy.apply import ScoreRecord, apply_policy, raw_scores, records
from tokmarg.policy.file import Policy, read_policy
from tokmarg.policy.setup import expected_identity, policy_config
from tokmarg.settings import EngineOptions
from tokmarg.taxonomy import Taxonomy
from tokmarg.worker import Partition, Worker, WorkerSpec

Conversation = str | Mapping | Sequence[Mapping]


class ScorerError(TokmargError, ValueError):
    """A conversation that cannot be scored; one line naming it."""


def to_sample(conv: Conversation, i: int, taxonomy: Taxonomy) -> Sample:
    """A conversation as a sample: a string is one user message; a mapping is a dataset record
    (``prompt``/``response``, ``conversation``, optional ``id``; labels not needed); a list of
    ``{role, content}`` mappings is a conversation. Its id defaults to its position."""
    if isinstance(conv, str):
        if not conv.strip():
            raise ScorerError(f"conversations[{i}]: empty text")
        return Sample(str(i), (Turn("user", conv),), (), i + 1)
    obj = dict(conv) if isinstance(conv, Mapping) else {"conversation": list(conv)}
    obj.setdefault("id", str(i))
    try:
        return parse_line(obj, i + 1, taxonomy, labeled=False)
    except ValueError as e:
        raise ScorerError(f"conversations[{i}]: {e}") from None


class Scorer:
    """One policy's model, loaded in this process; :meth:`score` applies the policy."""

    def __init__(self, policy: Policy, worker: Worker, taxonomy: Taxonomy) -> None:
        self.policy, self.worker, self.taxonomy = policy, worker, taxonomy

    @classmethod
    def from_policy(
        cls,
        path: str | Path,
        *,
        model: str | None = None,
        params: str | Path | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 0,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
    ) -> Scorer:
        """Load the policy at ``path`` and its model (``model``: another copy of it, a path or
        id); refuses (a one-line :class:`~tokmarg.errors.TokmargError`) a model, prompt, taxonomy
        or strategy parameters that differ from the policy's."""
        path = Path(path)
        policy = read_policy(path)
        name = model or policy.model["id"]
        user = load_params(params) if params else {}
        cfg = policy_config(policy, path, name, Path(params) if params else None, user, device, dtype)
        spec = WorkerSpec.from_config(
            cfg.models[0],
            cfg,
            engine=EngineOptions(batch_size=batch_size),
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
            expect=expected_identity(policy, path),
        )
        return cls(policy, Worker(spec), cfg.taxonomy)

    def score(self, conversations: Iterable[Conversation]) -> list[ScoreRecord]:
        """One record per conversation, in order."""
        taxonomy = self.taxonomy.complete()  # labels a record carries are checked, then ignored
        samples = tuple(to_sample(c, i, taxonomy) for i, c in enumerate(conversations))
        if not samples:
            return []
        decide = bool(self.policy.strategy.get("decide_safe", True))
        res = self.worker.run_partition(Partition(0, 0, len(samples), decide, loaded=samples))
        outs = res.outputs[self.policy.strategy["name"]]
        raw = raw_scores([o.scores for o in outs], self.policy.labels)
        applied = apply_policy(self.policy, raw)
        return records(self.policy, [s.id for s in samples], raw, [o.unexplored_mass for o in outs], applied)
