"""Tier a (no model): dataset loading and validation, tokmarg.data."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from tokmarg.data import (
    BEAVERTAILS_TO_LLAMA_GUARD,
    DataError,
    Dataset,
    Turn,
    load_dataset,
    parse_line,
)
from tokmarg.taxonomy import LLAMA_GUARD_2, LLAMA_GUARD_3, Taxonomy, taxonomy_from_mapping

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
BT_CATEGORIES = sorted(BEAVERTAILS_TO_LLAMA_GUARD["llama_guard_3"])
CUSTOM = taxonomy_from_mapping("mine", [{"code": "A", "name": "Alpha"}, {"code": "B", "name": "Beta"}], "t")


def write(tmp_path: Path, lines: list[object | str], name: str = "d.jsonl") -> Path:
    """Write one JSONL line per item (strings verbatim, anything else JSON-encoded)."""
    path = tmp_path / name
    text = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    path.write_text(text, encoding="utf-8")
    return path


def bt_row(true_cats: list[str], is_safe: bool = False) -> dict:
    return {
        "prompt": "q",
        "response": "r",
        "category": {c: c in true_cats for c in BT_CATEGORIES},
        "is_safe": is_safe,
    }


def load_one(tmp_path: Path, obj: object, taxonomy: Taxonomy = LLAMA_GUARD_3) -> Dataset:
    return load_dataset(write(tmp_path, [obj]), taxonomy)


# ----------------------------------------------------------------- shapes


def test_paper_shape_lg3(tmp_path: Path) -> None:
    d = load_one(tmp_path, {"unsafe_query": "bad thing", "llama_guard_3_categories": ["S10", "S4"]})
    (s,) = d.samples
    assert s.conversation == (Turn("user", "bad thing"),)
    assert s.true_codes == ("S4", "S10")
    assert (s.id, s.line) == ("1", 1)


def test_paper_shape_lg2(tmp_path: Path) -> None:
    d = load_one(tmp_path, {"unsafe_query": "x", "llama_guard_2_categories": ["S11"]}, LLAMA_GUARD_2)
    assert d.samples[0].true_codes == ("S11",)


def test_general_prompt_and_response(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            {"id": "a", "prompt": "hi", "labels": []},
            {"id": "b", "prompt": "q", "response": "r", "labels": ["S2"]},
        ],
    )
    d = load_dataset(path, LLAMA_GUARD_3)
    a, b = d.samples
    assert a.conversation == (Turn("user", "hi"),) and a.true_codes == () and a.id == "a"
    assert b.conversation == (Turn("user", "q"), Turn("assistant", "r")) and b.true_codes == ("S2",)
    assert d.has_safe
    assert d.path == str(path) and len(d.sha256) == 64
    assert (d.n_skipped, d.skipped) == (0, ())


def test_general_conversation(tmp_path: Path) -> None:
    conv = [
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
    ]
    d = load_one(tmp_path, {"conversation": conv, "labels": ["S7"]})
    assert [t.role for t in d.samples[0].conversation] == ["user", "assistant", "user"]
    assert d.samples[0].conversation[2].content == "u2"
    assert not d.has_safe


@pytest.mark.parametrize(
    ("conv", "reason"),
    [
        ([], "'conversation' is empty"),
        ("hello", "must be a list"),
        ([{"role": "system", "content": "x"}], "conversation[0].role"),
        ([{"role": "user", "content": "  "}], "conversation[0].content is empty"),
        ([{"role": "user", "content": "ok"}, {"role": "assistant"}], "conversation[1].content"),
        (["hi"], "conversation[0] must be an object"),
    ],
)
def test_bad_conversation(conv: object, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        parse_line({"conversation": conv, "labels": []}, 1, LLAMA_GUARD_3)


def test_ids_default_to_line_numbers(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            {"prompt": "a", "labels": []},
            {"id": "x", "prompt": "b", "labels": []},
            {"prompt": "c", "labels": []},
        ],
    )
    assert [s.id for s in load_dataset(path, LLAMA_GUARD_3).samples] == ["1", "x", "3"]


def test_labels_deduplicated_in_taxonomy_order() -> None:
    s = parse_line({"prompt": "p", "labels": ["S14", "S2", "S10", "S2", "S1"]}, 5, LLAMA_GUARD_3)
    assert s.true_codes == ("S1", "S2", "S10", "S14")
    assert (s.id, s.line) == ("5", 5)


def test_custom_taxonomy_general_shape() -> None:
    assert parse_line({"prompt": "p", "labels": ["B", "A"]}, 1, CUSTOM).true_codes == ("A", "B")


# ----------------------------------------------------------------- record errors


@pytest.mark.parametrize(
    ("obj", "taxonomy", "reason"),
    [
        (
            {"unsafe_query": "x", "llama_guard_3_categories": ["S1"]},
            LLAMA_GUARD_2,
            "requires taxonomy llama_guard_3",
        ),
        (
            {"unsafe_query": "x", "llama_guard_2_categories": ["S1"]},
            LLAMA_GUARD_3,
            "requires taxonomy llama_guard_2",
        ),
        ({"unsafe_query": "x", "llama_guard_3_categories": ["S1"]}, CUSTOM, "but the taxonomy is mine"),
        ({"unsafe_query": "x"}, LLAMA_GUARD_3, "exactly one of"),
        ({"unsafe_query": "x", "llama_guard_3_categories": ["S15"]}, LLAMA_GUARD_3, "unknown code 'S15'"),
        ({"prompt": "x", "labels": ["S12"]}, LLAMA_GUARD_2, "unknown code 'S12' for taxonomy llama_guard_2"),
        ({"prompt": "x", "labels": 5}, LLAMA_GUARD_3, "'labels' must be a list"),
        ({"prompt": "x", "labels": [1]}, LLAMA_GUARD_3, "'labels' must contain strings"),
        ({"prompt": 3, "labels": []}, LLAMA_GUARD_3, "'prompt' must be a string"),
        ({"prompt": "   ", "labels": []}, LLAMA_GUARD_3, "'prompt' is empty text"),
        ({"prompt": "x", "response": "", "labels": []}, LLAMA_GUARD_3, "'response' is empty text"),
        ({"unsafe_query": "", "llama_guard_3_categories": []}, LLAMA_GUARD_3, "'unsafe_query' is empty text"),
        ({"labels": []}, LLAMA_GUARD_3, "missing field 'prompt' or 'conversation'"),
        ({"prompt": "x"}, LLAMA_GUARD_3, "unrecognised record shape"),
        ({"text": "x"}, LLAMA_GUARD_3, "unrecognised record shape"),
        ({"prompt": "x", "labels": [], "is_safe": True}, LLAMA_GUARD_3, "ambiguous record"),
        ({"id": 7, "prompt": "x", "labels": []}, LLAMA_GUARD_3, "'id' must be a non-empty string"),
        (["prompt", "x"], LLAMA_GUARD_3, "expected a JSON object, got list"),
        (
            {"conversation": [{"role": "user", "content": "x"}], "prompt": "y", "labels": []},
            LLAMA_GUARD_3,
            "cannot be combined",
        ),
    ],
)
def test_record_errors(obj: object, taxonomy: Taxonomy, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_line(obj, 1, taxonomy)
    assert reason in str(info.value)


def test_bad_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, [{"prompt": "ok", "labels": []}, "{not json", {"prompt": "ok2", "labels": []}])
    with pytest.raises(DataError) as info:
        load_dataset(path, LLAMA_GUARD_3)
    msg = str(info.value)
    assert msg.startswith(f"{path}:2: not valid JSON")
    assert "\n" not in msg


def test_unknown_code_error_message(tmp_path: Path) -> None:
    path = write(tmp_path, [{"prompt": "ok", "labels": ["S99"]}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: unknown code 'S99' for taxonomy llama_guard_3"):
        load_dataset(path, LLAMA_GUARD_3)


def test_skip_invalid_counts_and_keeps_good(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            {"prompt": "good1", "labels": ["S1"]},
            "not json",
            {"prompt": "bad", "labels": ["S42"]},
            {"prompt": "good2", "labels": []},
            "[1, 2]",
        ],
    )
    d = load_dataset(path, LLAMA_GUARD_3, skip_invalid=True)
    assert [s.conversation[0].content for s in d.samples] == ["good1", "good2"]
    assert [s.line for s in d.samples] == [1, 4]
    assert d.n_skipped == 3
    assert [m.split(": ")[0] for m in d.skipped] == [f"{path}:2", f"{path}:3", f"{path}:5"]


def test_blank_lines_skipped_with_true_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "b.jsonl"
    path.write_text('\n{"prompt": "a", "labels": []}\n   \n\t\r\n{"prompt": "b", "labels": []}\r\n\n', encoding="utf-8")
    d = load_dataset(path, LLAMA_GUARD_3)
    assert [(s.id, s.line) for s in d.samples] == [("2", 2), ("5", 5)]
    assert d.n_skipped == 0


def test_duplicate_id(tmp_path: Path) -> None:
    path = write(tmp_path, [{"id": "a", "prompt": "x", "labels": []}, {"id": "a", "prompt": "y", "labels": []}])
    with pytest.raises(DataError, match=r":2: duplicate sample id 'a' \(first on line 1\)"):
        load_dataset(path, LLAMA_GUARD_3)
    d = load_dataset(path, LLAMA_GUARD_3, skip_invalid=True)
    assert len(d.samples) == 1 and d.n_skipped == 1


def test_explicit_id_colliding_with_default_id(tmp_path: Path) -> None:
    path = write(tmp_path, [{"prompt": "x", "labels": []}, {"id": "1", "prompt": "y", "labels": []}])
    with pytest.raises(DataError, match="duplicate sample id '1'"):
        load_dataset(path, LLAMA_GUARD_3)


# ----------------------------------------------------------------- file errors


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as info:
        load_dataset(path, LLAMA_GUARD_3)
    assert str(info.value) == f"{path}: no such file"


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"prompt": "ok", "labels": []}\n{"prompt": "caf\xe9", "labels": []}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl: not valid UTF-8 \(line 2"):
        load_dataset(path, LLAMA_GUARD_3, skip_invalid=True)


@pytest.mark.parametrize("content", ["", "\n  \n", "oops\n"])
def test_no_valid_samples(tmp_path: Path, content: str) -> None:
    path = tmp_path / "e.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="no valid samples"):
        load_dataset(path, LLAMA_GUARD_3, skip_invalid=True)


def test_limit(tmp_path: Path) -> None:
    path = write(tmp_path, [{"prompt": f"p{i}", "labels": []} for i in range(5)] + ["broken"])
    d = load_dataset(path, LLAMA_GUARD_3, limit=3)
    assert [s.id for s in d.samples] == ["1", "2", "3"]
    # lines after the limit are not read, so the broken last line does not raise
    assert len(load_dataset(path, LLAMA_GUARD_3, limit=5).samples) == 5
    with pytest.raises(ValueError, match="limit"):
        load_dataset(path, LLAMA_GUARD_3, limit=0)


def test_sha256_of_bytes(tmp_path: Path) -> None:
    path = write(tmp_path, [{"prompt": "x", "labels": []}])
    assert load_dataset(path, LLAMA_GUARD_3).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------- BeaverTails


def test_beavertails_mapping_tables() -> None:
    for name, tax in (("llama_guard_3", LLAMA_GUARD_3), ("llama_guard_2", LLAMA_GUARD_2)):
        table = BEAVERTAILS_TO_LLAMA_GUARD[name]
        assert len(table) == 14
        assert set(table.values()) <= set(tax.codes)
    assert BEAVERTAILS_TO_LLAMA_GUARD["llama_guard_3"]["privacy_violation"] == "S7"
    assert BEAVERTAILS_TO_LLAMA_GUARD["llama_guard_2"]["privacy_violation"] == "S6"


def test_beavertails_same_code_once() -> None:
    cats = ["terrorism,organized_crime", "violence,aiding_and_abetting,incitement", "self_harm"]
    s = parse_line(bt_row(cats), 1, LLAMA_GUARD_3)
    assert s.true_codes == ("S1", "S11")
    assert s.conversation == (Turn("user", "q"), Turn("assistant", "r"))
    assert parse_line(bt_row(cats), 1, LLAMA_GUARD_2).true_codes == ("S1", "S10")


def test_beavertails_is_safe() -> None:
    assert parse_line(bt_row([], is_safe=True), 1, LLAMA_GUARD_3).true_codes == ()
    # is_safe wins even if a category flag is set
    assert parse_line(bt_row(["self_harm"], is_safe=True), 1, LLAMA_GUARD_3).true_codes == ()


@pytest.mark.parametrize(
    ("obj", "taxonomy", "reason"),
    [
        (bt_row(["self_harm"]), CUSTOM, "no BeaverTails mapping for taxonomy mine"),
        (
            {**bt_row([]), "category": {"made_up": True}},
            LLAMA_GUARD_3,
            "unknown BeaverTails category 'made_up'",
        ),
        ({**bt_row([]), "category": {"self_harm": 1}}, LLAMA_GUARD_3, "must be true or false"),
        ({**bt_row([]), "is_safe": "no"}, LLAMA_GUARD_3, "'is_safe' must be true or false"),
        (bt_row([], is_safe=False), LLAMA_GUARD_3, "no category is true"),
        ({k: v for k, v in bt_row([]).items() if k != "response"}, LLAMA_GUARD_3, "missing field 'response'"),
        ({k: v for k, v in bt_row([]).items() if k != "is_safe"}, LLAMA_GUARD_3, "missing field 'is_safe'"),
    ],
)
def test_beavertails_errors(obj: object, taxonomy: Taxonomy, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_line(obj, 1, taxonomy)
    assert reason in str(info.value)


# ----------------------------------------------------------------- shipped datasets


def test_shipped_sample_dataset() -> None:
    d = load_dataset(REPO / "datasets" / "sample.jsonl", LLAMA_GUARD_3)
    assert len(d.samples) >= 75 and d.n_skipped == 0
    counts = Counter(c for s in d.samples for c in s.true_codes)
    assert all(counts[c] >= 3 for c in LLAMA_GUARD_3.codes), counts
    assert sum(not s.true_codes for s in d.samples) >= 18
    assert sum(len(s.true_codes) >= 2 for s in d.samples) >= 15
    assert sum(any(t.role == "assistant" for t in s.conversation) for s in d.samples) >= 12
    assert all(s.id == f"s{i:03d}" for i, s in enumerate(d.samples, start=1))


def test_shipped_beavertails_sample() -> None:
    for tax in (LLAMA_GUARD_3, LLAMA_GUARD_2):
        d = load_dataset(REPO / "datasets" / "beavertails_sample.jsonl", tax)
        assert len(d.samples) >= 10 and d.has_safe
        assert all(len(s.conversation) == 2 for s in d.samples)


@pytest.mark.parametrize(
    ("name", "taxonomy", "rows"),
    [
        ("content_moderation_lm3.jsonl", LLAMA_GUARD_3, 2295),
        ("content_moderation_lm2.jsonl", LLAMA_GUARD_2, 1266),
    ],
)
def test_shared_paper_datasets(name: str, taxonomy: Taxonomy, rows: int) -> None:
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    d = load_dataset(path, taxonomy)
    assert len(d.samples) == rows and d.n_skipped == 0
    assert all(len(s.conversation) == 1 and s.true_codes for s in d.samples)
    other = LLAMA_GUARD_2 if taxonomy is LLAMA_GUARD_3 else LLAMA_GUARD_3
    with pytest.raises(DataError, match=":1: field 'llama_guard_"):
        load_dataset(path, other)


def test_excluded_codes_are_dropped_from_the_labels(tmp_path: Path) -> None:
    """`exclude_codes`: labels of excluded codes are valid, then dropped; a row left with none is
    safe; the rows that changed are counted."""
    p = tmp_path / "d.jsonl"
    rows = [
        {"prompt": "a", "labels": ["S1", "S14"]},
        {"prompt": "b", "labels": ["S14"]},
        {"prompt": "c", "labels": ["S2"]},
        {"prompt": "d", "labels": []},
    ]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    ds = load_dataset(p, LLAMA_GUARD_3.without(["S14"]))
    assert [s.true_codes for s in ds.samples] == [("S1",), (), ("S2",), ()]
    assert ds.n_relabeled == 2
    assert load_dataset(p, LLAMA_GUARD_3).n_relabeled == 0
    with pytest.raises(DataError, match="unknown code 'S14'"):  # a code the taxonomy never had stays an error
        load_dataset(p, Taxonomy("t", LLAMA_GUARD_3.categories[:13]))


def test_labels_as_a_comma_separated_string() -> None:
    assert parse_line({"prompt": "x", "labels": "S2, S1,"}, 1, LLAMA_GUARD_3).true_codes == ("S1", "S2")
    assert parse_line({"prompt": "x", "labels": ""}, 1, LLAMA_GUARD_3).true_codes == ()


# ----------------------------------------------------------------- a kept scan


def test_a_kept_scan_gives_the_same_dataset_and_only_under_the_same_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tokmarg import data, scanindex
    from tokmarg.rundir import write_table

    lines = [
        {"id": "a", "prompt": "p1", "labels": ["S1", "S14"]},
        "not json",
        {
            "id": "b",
            "conversation": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "x"}],
            "labels": "",
        },
        "",
        {"id": "c", "prompt": "p3", "response": "r3", "labels": ["S2"]},
    ]
    path, index = write(tmp_path, lines), tmp_path / "run" / scanindex.INDEX_FILE
    lg3 = LLAMA_GUARD_3.without(["S14"])  # c's S14 is dropped: a relabeled sample
    scanned = load_dataset(path, lg3, skip_invalid=True)
    table, meta = scanindex.table(scanned.index())
    write_table(table, index, meta)
    calls = []
    monkeypatch.setattr(data, "rows", lambda *a, **k: calls.append(a) or iter(()))  # any read of the rows: none
    kept = load_dataset(path, lg3, skip_invalid=True, index=index)
    assert kept.indexed and not scanned.indexed and not calls
    for name in ("path", "sha256", "codes", "n_skipped", "skipped", "n_relabeled", "probes", "key"):
        assert getattr(kept, name) == getattr(scanned, name), name
    assert kept.ids.equals(scanned.ids) and (kept.labels == scanned.labels).all()
    assert kept.n_relabeled == 1 and kept.n_skipped == 1 and [p.id for p in kept.probes] == ["a", "b"]
    monkeypatch.undo()
    assert kept.samples == scanned.samples  # samples are parsed from the file at the rows the scan found
    # anything else and the file is read again: other arguments, another file, an unreadable index
    assert not load_dataset(path, LLAMA_GUARD_3, skip_invalid=True, index=index).indexed
    assert not load_dataset(path, lg3, skip_invalid=True, limit=1, index=index).indexed
    path.write_text(path.read_text(encoding="utf-8") + json.dumps({"prompt": "d", "labels": []}) + "\n")
    again = load_dataset(path, lg3, skip_invalid=True, index=index)
    assert not again.indexed and len(again) == 4
    index.write_bytes(b"not parquet")
    assert not load_dataset(path, lg3, skip_invalid=True, index=index).indexed
