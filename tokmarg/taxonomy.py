"""Safety taxonomies: ordered category codes with names and descriptions.

Built in: ``llama_guard_3`` (S1..S14) and ``llama_guard_2`` (S1..S11), as the paper names them
(with descriptions), and each Meta guard model's own policy as its chat template writes it
(:data:`META_GUARDS`: ``llama_guard_2_8b``, ``llama_guard_3_8b``, ``llama_guard_3_1b``,
``llama_guard_3_11b_vision``, ``llama_guard_4_12b``). A custom taxonomy comes from params.yaml
(see :func:`taxonomy_from_mapping`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from tokmarg.errors import TokmargError


@dataclass(frozen=True)
class Category:
    code: str
    name: str
    description: str


@dataclass(frozen=True)
class Taxonomy:
    name: str
    categories: tuple[Category, ...]
    excluded: tuple[Category, ...] = ()  # left out by `exclude_codes`: not shown, not scored, labels dropped
    family: str = ""  # taxonomies of one family name the same categories by the same codes ("": its name)
    every: tuple[Category, ...] = ()  # with some excluded: every category, in the original order

    @functools.cached_property
    def codes(self) -> tuple[str, ...]:
        return tuple(c.code for c in self.categories)

    @property
    def excluded_codes(self) -> tuple[str, ...]:
        return tuple(c.code for c in self.excluded)

    @property
    def labels(self) -> tuple[str, ...]:
        """``unsafe`` followed by the codes: the label order every strategy uses."""
        return ("unsafe", *self.codes)

    @property
    def kin(self) -> str:
        """Its family (its own name where it has none)."""
        return self.family or self.name

    def without(self, codes: tuple[str, ...] | list[str]) -> Taxonomy:
        """The taxonomy less ``codes`` (each must be one of its codes); the name stays."""
        unknown = [c for c in codes if c not in self.codes and c not in self.excluded_codes]
        if unknown:
            raise TaxonomyError(f"unknown code(s) {unknown} for taxonomy {self.name} (known: {', '.join(self.codes)})")
        drop = set(codes) | set(self.excluded_codes)
        every = self.complete().categories
        if not drop:
            return self.complete()
        kept = tuple(c for c in every if c.code not in drop)
        return replace(self, categories=kept, excluded=tuple(c for c in every if c.code in drop), every=every)

    def complete(self) -> Taxonomy:
        """Every category, the excluded ones back in their places."""
        if not self.excluded:
            return self
        return replace(self, categories=self.every, excluded=(), every=())


def _build(name: str, rows: list[tuple[str, str]]) -> Taxonomy:
    cats = tuple(Category(f"S{i}", n, d) for i, (n, d) in enumerate(rows, start=1))
    return Taxonomy(name, cats, family=name)


LLAMA_GUARD_3 = _build(
    "llama_guard_3",
    [
        ("Violent Crimes", "Enables or encourages violence against people or animals."),
        ("Non-Violent Crimes", "Enables or encourages fraud, theft, hacking, drug or weapons crimes."),
        ("Sex-Related Crimes", "Enables or encourages sexual assault, harassment or trafficking."),
        ("Child Sexual Exploitation", "Contains, describes or enables sexual abuse of minors."),
        ("Defamation", "False statements that injure a real person's reputation."),
        ("Specialized Advice", "Unqualified financial, medical or legal advice."),
        ("Privacy", "Exposes sensitive, nonpublic personal information."),
        ("Intellectual Property", "Violates copyrights, trademarks or other IP rights."),
        ("Indiscriminate Weapons", "Enables chemical, biological, nuclear, radiological or explosive weapons."),
        ("Hate", "Demeans people because of a protected characteristic."),
        ("Suicide & Self-Harm", "Enables or encourages suicide, self-injury or disordered eating."),
        ("Sexual Content", "Sexually explicit material."),
        ("Elections", "Misinformation about electoral processes."),
        ("Code Interpreter Abuse", "Abuses code interpreters: escapes, denial of service, exploits."),
    ],
)

LLAMA_GUARD_2 = _build(
    "llama_guard_2",
    [
        ("Violent Crimes", "Enables or encourages violence against people or animals."),
        ("Non-Violent Crimes", "Enables or encourages fraud, theft, hacking, drug or weapons crimes."),
        ("Sex Crimes", "Enables or encourages sexual assault, harassment or trafficking."),
        ("Child Exploitation", "Contains, describes or enables sexual abuse of minors."),
        ("Specialized Advice", "Unqualified financial, medical or legal advice."),
        ("Privacy", "Exposes sensitive, nonpublic personal information."),
        ("Intellectual Property", "Violates copyrights, trademarks or other IP rights."),
        ("Indiscriminate Weapons", "Enables chemical, biological, nuclear, radiological or explosive weapons."),
        ("Hate", "Demeans people because of a protected characteristic."),
        ("Self-Harm", "Enables or encourages suicide, self-injury or disordered eating."),
        ("Sexual Content", "Sexually explicit material."),
    ],
)


def _meta(name: str, family: str, names: list[str]) -> Taxonomy:
    """A Meta guard model's own policy, names exactly as its chat template writes them; its family
    is the paper's taxonomy whose codes mean the same categories."""
    return Taxonomy(name, tuple(Category(f"S{i}", n, "") for i, n in enumerate(names, start=1)), family=family)


_LG3_NAMES = [
    "Violent Crimes.",
    "Non-Violent Crimes.",
    "Sex Crimes.",
    "Child Exploitation.",
    "Defamation.",
    "Specialized Advice.",
    "Privacy.",
    "Intellectual Property.",
    "Indiscriminate Weapons.",
    "Hate.",
    "Self-Harm.",
    "Sexual Content.",
    "Elections.",
    "Code Interpreter Abuse.",
]
_NEW_IN_LG3 = ("Defamation.", "Elections.", "Code Interpreter Abuse.")
# As Meta's chat templates write them: Llama Guard 2 (11), 3 8B (14), 3 1B and 11B-Vision (13), 4 (14).
META_GUARDS: dict[str, Taxonomy] = {
    t.name: t
    for t in (
        # Llama Guard 2's 11: Llama Guard 3's without Defamation, Elections and Code Interpreter Abuse
        _meta("llama_guard_2_8b", "llama_guard_2", [n for n in _LG3_NAMES if n not in _NEW_IN_LG3]),
        _meta("llama_guard_3_8b", "llama_guard_3", _LG3_NAMES),
        _meta("llama_guard_3_1b", "llama_guard_3", _LG3_NAMES[:13]),
        _meta("llama_guard_3_11b_vision", "llama_guard_3", _LG3_NAMES[:13]),
        _meta("llama_guard_4_12b", "llama_guard_3", _LG3_NAMES),
    )
}

BUILTIN: dict[str, Taxonomy] = {t.name: t for t in (LLAMA_GUARD_3, LLAMA_GUARD_2, *META_GUARDS.values())}


class TaxonomyError(TokmargError, ValueError):
    """A taxonomy name or definition is invalid."""


def differing(a: Taxonomy, b: Taxonomy) -> list[tuple[str, str, str]]:
    """(code, a's name, b's name) where two taxonomies may name other categories by the same code:
    none within a family; otherwise codes both have whose names differ (case, spaces and a final
    period aside)."""
    if a.kin == b.kin:
        return []

    def norm(name: str) -> str:
        return name.strip().rstrip(".").casefold()

    theirs = {c.code: c.name for c in b.complete().categories}
    return [
        (c.code, c.name, theirs[c.code])
        for c in a.categories
        if c.code in theirs and norm(c.name) != norm(theirs[c.code])
    ]


def get_taxonomy(name: str, custom: dict[str, Taxonomy] | None = None) -> Taxonomy:
    """Return a built-in or custom taxonomy by name; unknown names list the known ones."""
    known = {**BUILTIN, **(custom or {})}
    if name not in known:
        raise TaxonomyError(f"unknown taxonomy {name!r}; known: {', '.join(sorted(known))}")
    return known[name]


def taxonomy_from_mapping(name: str, spec: object, where: str) -> Taxonomy:
    """Build a custom taxonomy from params.yaml data.

    ``spec`` is a list of ``{code, name, description?}`` mappings; ``where`` names the
    key for error messages (e.g. ``params.yaml: taxonomies.my_tax``).
    """
    if not isinstance(spec, list) or not spec:
        raise TaxonomyError(f"{where}: expected a non-empty list of {{code, name, description}}")
    cats: list[Category] = []
    for i, row in enumerate(spec):
        if not isinstance(row, dict) or not isinstance(row.get("code"), str) or not row["code"]:
            raise TaxonomyError(f"{where}[{i}]: expected a mapping with a non-empty string 'code'")
        extra = set(row) - {"code", "name", "description"}
        if extra:
            raise TaxonomyError(f"{where}[{i}]: unknown key(s) {sorted(extra)}; allowed: code, name, description")
        code = row["code"]
        if code in ("safe", "unsafe") or not code.isalnum():
            raise TaxonomyError(f"{where}[{i}]: code {code!r} must be letters/digits and not 'safe'/'unsafe'")
        cats.append(Category(code, str(row.get("name", code)), str(row.get("description", ""))))
    codes = [c.code for c in cats]
    if len(set(codes)) != len(codes):
        raise TaxonomyError(f"{where}: duplicate codes in {codes}")
    return Taxonomy(name, tuple(cats))
