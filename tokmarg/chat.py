"""What a model's chat template reads, found by rendering probes, and each sample's prompt as the
model will read it, checked.

Meta's chat templates differ in ways that a wrong guess turns into a silent wrong result:

* **content shape**: Llama Guard 2 and 3 8B read a message's ``content`` as a string; Llama Guard
  3 1B, 3 11B-Vision and 4 read a list of parts (``[{"type": "text", "text": ...}]``) and render
  string content as an empty conversation, with no error. :func:`template_facts` renders a probe
  both ways and keeps the shape whose output shows the probe's text.
* **policy**: the newer guard templates take the category list as template variables
  (``categories``: code -> name, ``excluded_category_keys``); the older ones hard-code it.
  tokmarg passes the model's taxonomy where the template takes it; where the template hard-codes
  another list, its category lines are swapped for the taxonomy's in the template's own line format
  (all else is the template's text), or, where its block holds more than ``code: name`` lines,
  refused (never a model reading one policy while tokmarg scores another). A taxonomy of the same
  family as the template's own list (the same categories by the same codes) keeps the template's
  names. This holds for every prompt format: an ``instruct`` prompt on a guard template sits
  inside the template's policy block too.
* **system role**: the guard templates refuse a system message; the ``instruct`` prompt then
  puts its system text first in the user turn.

:class:`ModelPrompt` renders every sample this way and checks the result: a prompt that lacks a
message's text is refused in one line naming the model and the template.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from jinja2 import TemplateError

from tokmarg.data import Sample, Turn
from tokmarg.prompts import PromptError, PromptFormat, apply_template, messages, prompt_ids
from tokmarg.taxonomy import META_GUARDS, Taxonomy

ContentShape = Literal["string", "parts"]
PROBE = "tokmarg probe q7z"
_SYSTEM_PROBE = "tokmarg system probe k3w"
_POLICY = re.compile(r"<BEGIN UNSAFE CONTENT CATEGORIES>\n(.*?)<END UNSAFE CONTENT CATEGORIES>", re.S)
_CATEGORY = re.compile(r"^(\w+): (.*?\S)([ \t]*)$")


@dataclass(frozen=True)
class TemplateFacts:
    """What one chat template reads (see the module docstring)."""

    shape: ContentShape  # how a message's content is passed
    takes_categories: bool  # the policy comes from the `categories` / `excluded_category_keys` variables
    system_ok: bool  # a system message renders (and shows)
    policy: tuple[tuple[str, str], ...] | None  # (code, name) the template writes by default; None: no policy block
    block: str = ""  # that policy block's lines exactly as the template writes them
    line_end: str | None = None  # what ends each `code: name` line (LG2: " \n"); None: lines of another form


def shaped(msgs: Iterable[dict[str, str]], shape: ContentShape) -> list[dict]:
    """Messages with their content as the template reads it."""
    if shape == "string":
        return [dict(m) for m in msgs]
    return [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in msgs]


def _renders(tokenizer: object, msgs: list[dict], needle: str) -> bool:
    try:
        return needle in apply_template(tokenizer, msgs)
    except PromptError:
        return False


def template_facts(tokenizer: object) -> TemplateFacts:
    """Probe a tokenizer's chat template (a few renders, no model)."""
    user = [{"role": "user", "content": PROBE}]
    shape: ContentShape = "string"
    if not _renders(tokenizer, user, PROBE) and _renders(tokenizer, shaped(user, "parts"), PROBE):
        shape = "parts"  # neither: stays "string", and the check of each prompt names the template
    source = getattr(tokenizer, "chat_template", None)
    takes = isinstance(source, str) and "categories" in _variables(source)
    system = [{"role": "system", "content": _SYSTEM_PROBE}, {"role": "user", "content": PROBE}]
    system_ok = _renders(tokenizer, shaped(system, shape), _SYSTEM_PROBE)
    try:
        match = _POLICY.search(apply_template(tokenizer, shaped(user, shape)))
    except PromptError:
        match = None
    if not match:
        return TemplateFacts(shape, takes, system_ok, None)
    block = match.group(1)
    rows = [_CATEGORY.match(line) for line in block.split("\n")[:-1]]
    policy = tuple((m.group(1), m.group(2)) for m in rows if m)
    ends = {m.group(3) + "\n" for m in rows if m}
    line_end = ends.pop() if len(ends) == 1 and all(rows) else None
    if line_end is not None and policy_block(policy, line_end) != block:
        line_end = None  # the block holds more than `code: name` lines: tokmarg cannot write its format
    return TemplateFacts(shape, takes, system_ok, policy, block, line_end)


def policy_block(policy: Sequence[tuple[str, str]], line_end: str) -> str:
    """A policy block's lines in a template's own format."""
    return "".join(f"{code}: {name}{line_end}" for code, name in policy)


def _variables(source: str) -> set[str]:
    """The undeclared variables a Jinja template reads (where it does not parse, e.g. transformers'
    own `{% generation %}` tag: every name it mentions)."""
    from jinja2 import Environment, meta

    try:
        return meta.find_undeclared_variables(Environment(extensions=["jinja2.ext.loopcontrols"]).parse(source))
    except TemplateError:
        return set(re.findall(r"[A-Za-z_]\w*", source))


def policy_of(taxonomy: Taxonomy) -> tuple[tuple[str, str], ...]:
    """(code, name) of a taxonomy's categories, names as it spells them."""
    return tuple((c.code, c.name) for c in taxonomy.categories)


@dataclass
class ModelPrompt:
    """How one model reads a sample: its prompt format and taxonomy through its chat template."""

    model: str
    tokenizer: object
    fmt: PromptFormat
    taxonomy: Taxonomy  # the policy it shows (its excluded codes left out)
    answer_prefix: str = ""
    facts: TemplateFacts = field(init=False)
    variables: dict = field(init=False)  # template variables (the policy, where the template takes it)
    swap: tuple[str, str] | None = field(init=False)  # (the template's policy block, the run's in its format)

    def __post_init__(self) -> None:
        self.facts = template_facts(self.tokenizer)
        self.variables, self.swap = {}, None
        facts = self.facts
        if facts.policy is None and not facts.takes_categories:
            return  # the template writes no policy of its own: the prompt format's text has the policy
        want = self.policy()
        if facts.takes_categories:
            self.variables = {"categories": dict(want), "excluded_category_keys": list(self.taxonomy.excluded_codes)}
            self._check_shown(want)
        elif want != facts.policy:
            if facts.line_end is None:
                raise PromptError(
                    f"model {self.model!r}: its chat template hard-codes a policy of {len(facts.policy)} categories "
                    f"({_brief(facts.policy)}) in lines tokmarg cannot rewrite, not the run's taxonomy "
                    f"{self.taxonomy.name!r} ({_brief(want)}): use the taxonomy that matches it or a prompt "
                    "template file"
                )
            # Meta's format with the run's policy: the template's own text (header tokens, task line,
            # conversation, instructions, answer position) with its category lines swapped for the run's
            self.swap = (_wrap(facts.block), _wrap(policy_block(want, facts.line_end)))

    def policy(self) -> tuple[tuple[str, str], ...]:
        """(code, name) of the categories the template's policy block is to show. Where the
        template's own list is a Meta taxonomy of the model taxonomy's family (the same categories
        under the same codes), its own names stay (the paper's `llama_guard_3` on Llama Guard 3 8B
        is Meta's prompt, byte for byte); otherwise the taxonomy's names."""
        own = dict(self.facts.policy or ())
        meta = next((t for t in META_GUARDS.values() if policy_of(t) == self.facts.policy), None)
        same = meta is not None and meta.kin == self.taxonomy.kin
        return tuple((c.code, own.get(c.code, c.name) if same else c.name) for c in self.taxonomy.categories)

    def _check_shown(self, want: tuple[tuple[str, str], ...]) -> None:
        """A template that takes `categories` must write them: refuse one that shows something else."""
        probe = [{"role": "user", "content": PROBE}]
        text = apply_template(self.tokenizer, shaped(probe, self.facts.shape), self.variables)
        if _wrap(policy_block(want, "\n")) not in text:
            raise PromptError(
                f"model {self.model!r}: its chat template takes `categories` but does not show the run's "
                f"policy ({_brief(want)}) as `code: name` lines; use a prompt template file"
            )

    @property
    def template_name(self) -> str:
        return f"{self.fmt.name} prompt through {self.model}'s chat template"

    def messages(self, sample: Sample) -> list[dict[str, str]]:
        """The messages before the chat template (system text folded where it refuses a system role)."""
        msgs = messages(self.fmt, sample, self.taxonomy)
        if msgs and msgs[0]["role"] == "system" and not self.facts.system_ok:
            rest = msgs[1:]
            if rest and rest[0]["role"] == "user":
                rest[0] = {"role": "user", "content": msgs[0]["content"] + "\n\n" + rest[0]["content"]}
                msgs = rest
        return msgs

    def text(self, sample: Sample) -> str:
        """The exact text the model reads, answer prefix included; refuses a prompt that lacks a
        message's text (a template reading another content shape, say)."""
        msgs = self.messages(sample)
        where = f"sample {sample.id!r} (line {sample.line})"
        try:
            text = apply_template(self.tokenizer, shaped(msgs, self.facts.shape), self.variables)
        except PromptError as e:
            raise PromptError(f"model {self.model!r}: {where}: {e}") from None
        if self.swap is not None:
            if self.swap[0] not in text:
                raise PromptError(f"model {self.model!r}: {where}: the template's policy block is missing")
            text = text.replace(self.swap[0], self.swap[1], 1)  # the first: the template's, before the conversation
        for i, m in enumerate(msgs):
            if m["content"].strip() not in text:
                raise PromptError(
                    f"model {self.model!r}: the {self.template_name} lost the text of message {i + 1} "
                    f"({m['role']}) of {where}"
                )
        return text + self.answer_prefix

    def ids(self, sample: Sample) -> tuple[int, ...]:
        return prompt_ids(self.tokenizer, self.text(sample))

    def check(self, samples: Iterable[Sample]) -> None:
        """Render one sample of each conversation shape (its sequence of roles): a template that
        cannot render one is refused here, at load time, naming the first such sample."""
        for s in role_patterns(samples):
            self.text(s)


def role_patterns(samples: Iterable[Sample]) -> tuple[Sample, ...]:
    """The first sample of each sequence of roles (what :meth:`ModelPrompt.check` renders)."""
    firsts: dict[tuple[str, ...], Sample] = {}
    for s in samples:
        firsts.setdefault(tuple(t.role for t in s.conversation), s)
    return tuple(firsts.values())


def probe_samples() -> tuple[Sample, ...]:
    """Two one-message samples that differ from their first character (for the shared prefix)."""
    return tuple(Sample(f"probe-{c}", (Turn("user", c),), (), 0) for c in ("x", "q"))


def _wrap(block: str) -> str:
    return f"<BEGIN UNSAFE CONTENT CATEGORIES>\n{block}<END UNSAFE CONTENT CATEGORIES>"


def _brief(policy: Sequence[tuple[str, str]]) -> str:
    if not policy:
        return "none"
    first = f"{policy[0][0]} {policy[0][1]!r}"
    return first if len(policy) == 1 else f"{first} ... {policy[-1][0]} {policy[-1][1]!r}"


def listing(prompts: Sequence[ModelPrompt], samples: Sequence[Sample], with_ids: bool = False) -> Iterator[str]:
    """``tokmarg prompts``: per model and sample a line ``== MODEL SAMPLE_ID (N tokens)``, then the
    exact text the model reads (answer prefix included), and with ``with_ids`` its token ids."""
    for mp in prompts:
        mp.check(samples)
        for s in samples:
            text = mp.text(s)
            ids = prompt_ids(mp.tokenizer, text)
            yield f"== {mp.model} {s.id} ({len(ids)} tokens)"
            yield text
            if with_ids:
                yield "ids: " + " ".join(map(str, ids))
