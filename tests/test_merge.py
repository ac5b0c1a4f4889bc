"""Merge rules: properties over random node answers, and one example per rule."""

from __future__ import annotations

import copy
import zlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.datadict import tag_for_keyword

from spanner.merge import (
    COUNT_TAGS,
    UNION_TAGS,
    Dedup,
    MergedMatch,
    head,
    merge,
    merge_top,
    page,
    page_heads,
    partition_of,
    sort_key,
    sort_matches,
    split,
)
from spanner.outcome import DicomJson
from spanner.packed import KEY_SEPARATOR, identity_key, pack, unpack
from spanner.query import IDENTITY_KEYS, ORDER_KEYS, Level

Copies = list[tuple[str, int, list[DicomJson]]]

STUDY_UID, STUDY_DATE, STUDY_TIME = "0020000D", "00080020", "00080030"
PATIENT_ID, ISSUER, PATIENT_NAME, DESCRIPTION = "00100020", "00100021", "00100010", "00081030"
MODALITIES, N_SERIES, N_INSTANCES = "00080061", "00201206", "00201208"
SOP_UID, CONTENT_DATE, CONTENT_TIME = "00080018", "00080023", "00080033"


def attr(vr: str, *values: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": list(values)} if values else {"vr": vr}


def tag(keyword: str) -> str:
    number = tag_for_keyword(keyword)
    assert number is not None
    return f"{number:08X}"


# --- strategies -------------------------------------------------------------------------------------------

def _maybe(inner: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any] | None]:
    """Absent, present but empty, or present with a value."""
    return st.one_of(st.none(), st.sampled_from([{"vr": "XX"}, {"vr": "XX", "Value": []}]), inner)


_uid = st.sampled_from(["1.2.1", "1.2.2", "1.2.3", "1.2.4", "1.2.5", "1.2.6"])
_date = st.sampled_from(["20240101", "20240102", "20231231", "2024.01.02", "junk"])
_time = st.sampled_from(["101500", "1015", "10", "101500.5", "10:15:01", "235959.999999"])
_count = st.one_of(st.integers(0, 20), st.integers(0, 20).map(str), st.just("x"))
_modalities = st.lists(st.sampled_from(["CT", "MR", "US", "PT"]), max_size=3)
_text = st.sampled_from(["A", "B", "Doe^John", ""])


_FIELDS: dict[str, st.SearchStrategy[dict[str, Any] | None]] = {
    STUDY_DATE: _maybe(_date.map(lambda v: attr("DA", v))),
    STUDY_TIME: _maybe(_time.map(lambda v: attr("TM", v))),
    DESCRIPTION: _maybe(_text.map(lambda v: attr("LO", v))),
    PATIENT_NAME: _maybe(_text.map(lambda v: attr("PN", {"Alphabetic": v}))),
    MODALITIES: _maybe(_modalities.map(lambda v: attr("CS", *v))),
    N_SERIES: _maybe(_count.map(lambda v: attr("IS", v))),
    N_INSTANCES: _maybe(_count.map(lambda v: attr("IS", v))),
}


@st.composite
def study_match(draw: st.DrawFn) -> DicomJson:
    """A STUDY-level match; about one in ten has no StudyInstanceUID."""
    ds: DicomJson = {}
    if draw(st.integers(0, 9)):
        ds[STUDY_UID] = attr("UI", draw(_uid))
    for key, strategy in _FIELDS.items():
        value = draw(strategy)
        if value is not None:
            ds[key] = value
    return ds


@st.composite
def node_answers(draw: st.DrawFn) -> Copies:
    names = draw(st.lists(st.sampled_from(["n1", "n2", "n3", "n4", "n5"]), min_size=1, max_size=5,
                          unique=True))
    return [(name, draw(st.integers(0, 2)), draw(st.lists(study_match(), max_size=8))) for name in names]


# --- reference model --------------------------------------------------------------------------------------

def copies_by_key(level: Level, answers: Copies) -> tuple[dict[str, list[tuple[str, DicomJson]]], int]:
    """Per key the first copy of every node, in (priority, name) order; and how many matches lack a key."""
    out: dict[str, list[tuple[str, DicomJson]]] = {}
    keyless = 0
    for name, _prio, matches in sorted(answers, key=lambda a: (a[1], a[0])):
        for ds in matches:
            key = identity_key(level, ds)
            if key is None:
                keyless += 1
            elif not any(node == name for node, _ in out.get(key, [])):
                out.setdefault(key, []).append((name, ds))
    return out, keyless


def by_key(level: Level, merged: list[MergedMatch]) -> dict[str, MergedMatch]:
    return {k: m for m in merged if (k := identity_key(level, m["dataset"])) is not None}


def count_of(a: dict[str, Any] | None) -> int | None:
    try:
        return int(a["Value"][0]) if a and a.get("Value") else None
    except ValueError:
        return None


def filled(ds: DicomJson) -> int:
    return sum(1 for a in ds.values() if a.get("Value") and any(v not in (None, "") for v in a["Value"]))


RELAXED = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- properties -------------------------------------------------------------------------------------------

@RELAXED
@given(node_answers(), st.sampled_from(list(Dedup)), st.data())
def test_result_does_not_depend_on_node_order(answers: Copies, dedup: Dedup, data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(answers))
    assert merge(Level.STUDY, dedup, shuffled) == merge(Level.STUDY, dedup, answers)


@RELAXED
@given(node_answers(), st.sampled_from(list(Dedup)))
def test_merge_is_idempotent(answers: Copies, dedup: Dedup) -> None:
    merged = merge(Level.STUDY, dedup, answers)
    again_input = [
        (name, prio, [m["dataset"] for m in merged if name in m["nodes"]]) for name, prio, _ in answers
    ]
    again = merge(Level.STUDY, dedup, again_input)
    assert again == merged


@RELAXED
@given(node_answers(), st.sampled_from(list(Dedup)))
def test_every_key_once_and_keyless_kept(answers: Copies, dedup: Dedup) -> None:
    expected, keyless = copies_by_key(Level.STUDY, answers)
    merged = merge(Level.STUDY, dedup, answers)
    keys = [identity_key(Level.STUDY, m["dataset"]) for m in merged]
    real = [k for k in keys if k is not None]
    assert len(real) == len(set(real))
    assert set(real) == set(expected)
    assert keys.count(None) == keyless
    got = by_key(Level.STUDY, merged)
    rank = {name: (prio, name) for name, prio, _ in answers}
    for key, copies in expected.items():
        assert got[key]["nodes"] == [n for n, _ in copies]
        assert got[key]["nodes"] == sorted(got[key]["nodes"], key=rank.__getitem__)


@RELAXED
@given(node_answers())
def test_merge_all_counts_take_the_max_and_lists_union(answers: Copies) -> None:
    expected, _ = copies_by_key(Level.STUDY, answers)
    got = by_key(Level.STUDY, merge(Level.STUDY, Dedup.MERGE_ALL, answers))
    for key, copies in expected.items():
        ds = got[key]["dataset"]
        for count_tag in (N_SERIES, N_INSTANCES):
            counts = [c for _, c_ds in copies if (c := count_of(c_ds.get(count_tag))) is not None]
            if counts:
                assert count_of(ds.get(count_tag)) == max(counts)
        union = {v for _, c_ds in copies for v in (c_ds.get(MODALITIES) or {}).get("Value", [])}
        values = (ds.get(MODALITIES) or {}).get("Value", [])
        assert set(values) == union
        if len(copies) > 1:  # a single copy is passed through untouched
            assert len(values) == len(set(values))
        # every attribute some copy fills is filled in the result
        for _, c_ds in copies:
            for t, a in c_ds.items():
                if filled({t: a}):
                    assert filled({t: ds[t]})


@RELAXED
@given(node_answers())
def test_first_wins_and_most_complete_pick_a_whole_copy(answers: Copies) -> None:
    expected, _ = copies_by_key(Level.STUDY, answers)
    first = by_key(Level.STUDY, merge(Level.STUDY, Dedup.FIRST_WINS, answers))
    complete = by_key(Level.STUDY, merge(Level.STUDY, Dedup.MOST_COMPLETE, answers))
    for key, copies in expected.items():
        assert first[key]["dataset"] == copies[0][1]
        best = max(filled(ds) for _, ds in copies)
        assert complete[key]["dataset"] == next(ds for _, ds in copies if filled(ds) == best)


@RELAXED
@given(node_answers(), st.sampled_from(list(Dedup)))
def test_inputs_are_not_mutated(answers: Copies, dedup: Dedup) -> None:
    before = copy.deepcopy(answers)
    merge(Level.STUDY, dedup, answers)
    assert answers == before


@RELAXED
@given(node_answers(), st.sampled_from(list(Dedup)), st.integers(1, 6), st.integers(0, 12),
       st.one_of(st.none(), st.integers(0, 12)))
def test_partitioned_merge_equals_single_merge(
    answers: Copies, dedup: Dedup, partitions: int, offset: int, limit: int | None
) -> None:
    single = merge(Level.STUDY, dedup, answers)
    split_answers = [(name, prio, split(pack(Level.STUDY, matches), partitions))
                     for name, prio, matches in answers]
    parts = [
        merge_top(Level.STUDY, dedup, [(name, prio, parts[i]) for name, prio, parts in split_answers])[1]
        for i in range(partitions)
    ]
    assert page(Level.STUDY, parts) == (len(single), single)
    stop = None if limit is None else offset + limit
    assert page(Level.STUDY, parts, offset, limit) == (len(single), single[offset:stop])


@RELAXED
@given(node_answers(), st.sampled_from(list(Dedup)), st.integers(0, 30))
def test_top_of_the_merge_is_the_head_of_the_full_merge(answers: Copies, dedup: Dedup, stop: int) -> None:
    """Selecting the first ``stop`` without sorting the rest, and merging only what they need, changes
    nothing: also where merge_all takes a date or time from a later copy and so moves the entity."""
    single = merge(Level.STUDY, dedup, answers)
    packs = [(name, prio, pack(Level.STUDY, matches)) for name, prio, matches in answers]
    assert merge_top(Level.STUDY, dedup, packs, stop) == (len(single), single[:stop])


def test_a_date_from_a_later_copy_moves_the_merged_entity() -> None:
    """The head copy has no date: merge_all fills it from the second node, and the order follows."""
    undated_head = study("1.1")
    dated_later = study("1.1", StudyDate=attr("DA", "20240105"))
    older = study("1.2", StudyDate=attr("DA", "20200101"))
    answers = [("a", 0, [undated_head]), ("b", 1, [dated_later, older])]
    packs = [(name, prio, pack(Level.STUDY, matches)) for name, prio, matches in answers]
    total, [newest] = merge_top(Level.STUDY, Dedup.MERGE_ALL, packs, 1)
    assert total == 2
    assert newest["dataset"][STUDY_UID]["Value"] == ["1.1"] and newest["nodes"] == ["a", "b"]
    assert newest["dataset"][STUDY_DATE]["Value"] == ["20240105"]
    _, [first] = merge_top(Level.STUDY, Dedup.FIRST_WINS, packs, 1)  # first_wins keeps the undated head
    assert first["dataset"][STUDY_UID]["Value"] == ["1.2"]


def test_pack_round_trips_and_refuses_another_level() -> None:
    matches = [study("1.1", StudyDate=attr("DA", "20240105")), study(None), {}]
    packed = pack(Level.STUDY, matches)
    assert len(packed) == 3 and unpack(packed) == matches
    assert packed.keys == ["1.1", None, None]
    with pytest.raises(ValueError, match="packed for STUDY"):
        merge_top(Level.SERIES, Dedup.MERGE_ALL, [("a", 0, packed)])


@RELAXED
@given(node_answers())
def test_merge_output_is_sorted(answers: Copies) -> None:
    merged = merge(Level.STUDY, Dedup.MERGE_ALL, answers)
    assert sort_matches(Level.STUDY, merged) == merged
    keys = [sort_key(Level.STUDY, m) for m in merged]
    assert keys == sorted(keys)


# --- examples ---------------------------------------------------------------------------------------------

def study(uid: str | None, **extra: dict[str, Any]) -> DicomJson:
    ds: DicomJson = {} if uid is None else {STUDY_UID: attr("UI", uid)}
    ds.update({tag(k): v for k, v in extra.items()})
    return ds


def test_tag_constants_match_the_query_model() -> None:
    assert identity_key(Level.STUDY, {tag(IDENTITY_KEYS[Level.STUDY][0]): attr("UI", "1.2")}) == "1.2"
    assert identity_key(Level.SERIES, {tag(IDENTITY_KEYS[Level.SERIES][0]): attr("UI", "1.3")}) == "1.3"
    assert identity_key(Level.IMAGE, {tag(IDENTITY_KEYS[Level.IMAGE][0]): attr("UI", "1.4")}) == "1.4"
    assert [tag(k) for k in IDENTITY_KEYS[Level.PATIENT]] == [PATIENT_ID, ISSUER]
    for level in (Level.STUDY, Level.SERIES, Level.IMAGE):
        keys = ORDER_KEYS[level]
        assert keys is not None
        old = {tag(keys[0]): attr("DA", "20200101"), tag(keys[1]): attr("TM", "120000")}
        new = {tag(keys[0]): attr("DA", "20200101"), tag(keys[1]): attr("TM", "120001")}
        matches: list[MergedMatch] = [{"dataset": ds, "nodes": ["a"]} for ds in (old, new)]
        assert [m["dataset"] for m in sort_matches(level, matches)] == [new, old]
    counts = ["NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
              "NumberOfPatientRelatedInstances",
              "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "NumberOfSeriesRelatedInstances"]
    assert list(COUNT_TAGS) == [tag(k) for k in counts]
    assert list(UNION_TAGS) == [tag("ModalitiesInStudy"), tag("SOPClassesInStudy")]


def test_identity_keys() -> None:
    assert identity_key(Level.STUDY, {STUDY_UID: attr("UI", "1.2.3")}) == "1.2.3"
    assert identity_key(Level.STUDY, {STUDY_UID: attr("UI")}) is None
    assert identity_key(Level.STUDY, {STUDY_UID: {"vr": "UI", "Value": []}}) is None
    assert identity_key(Level.STUDY, {}) is None
    assert identity_key(Level.PATIENT, {PATIENT_ID: attr("LO", "P1")}) == "P1" + KEY_SEPARATOR
    with_issuer = {PATIENT_ID: attr("LO", "P1"), ISSUER: attr("LO", "H")}
    assert identity_key(Level.PATIENT, with_issuer) == "P1" + KEY_SEPARATOR + "H"
    # "A" + "BC" and "AB" + "C" must not collide
    a = identity_key(Level.PATIENT, {PATIENT_ID: attr("LO", "A"), ISSUER: attr("LO", "BC")})
    b = identity_key(Level.PATIENT, {PATIENT_ID: attr("LO", "AB"), ISSUER: attr("LO", "C")})
    assert a != b
    assert identity_key(Level.PATIENT, {ISSUER: attr("LO", "H")}) is None


def test_patient_level_merges_on_id_and_issuer() -> None:
    p1 = {PATIENT_ID: attr("LO", "P1"), ISSUER: attr("LO", "H1"), PATIENT_NAME: attr("PN")}
    p1_named = {PATIENT_ID: attr("LO", "P1"), ISSUER: attr("LO", "H1"),
                PATIENT_NAME: attr("PN", {"Alphabetic": "Doe^Jane"})}
    p1_other_issuer = {PATIENT_ID: attr("LO", "P1"), ISSUER: attr("LO", "H2")}
    merged = merge(Level.PATIENT, Dedup.MERGE_ALL, [("a", 0, [p1, p1_other_issuer]), ("b", 1, [p1_named])])
    assert len(merged) == 2
    one = by_key(Level.PATIENT, merged)["P1" + KEY_SEPARATOR + "H1"]
    assert one["nodes"] == ["a", "b"]
    assert one["dataset"][PATIENT_NAME] == attr("PN", {"Alphabetic": "Doe^Jane"})


def test_first_wins_example() -> None:
    low = study("1.2", StudyDescription=attr("LO", "from b"))
    high = study("1.2", StudyDescription=attr("LO", "from a"))
    tie = study("1.2", StudyDescription=attr("LO", "from c"))
    merged = merge(Level.STUDY, Dedup.FIRST_WINS, [("b", 5, [low]), ("c", 1, [tie]), ("a", 1, [high])])
    assert merged == [{"dataset": high, "nodes": ["a", "c", "b"]}]


def test_most_complete_example() -> None:
    sparse = study("1.2", StudyDescription=attr("LO"))
    full = study("1.2", StudyDescription=attr("LO", "x"), AccessionNumber=attr("SH", "A1"))
    also_full = study("1.2", StudyDescription=attr("LO", "y"), StudyID=attr("SH", "7"))
    answers = [("a", 0, [sparse]), ("c", 2, [also_full]), ("b", 1, [full])]
    merged = merge(Level.STUDY, Dedup.MOST_COMPLETE, answers)
    assert merged == [{"dataset": full, "nodes": ["a", "b", "c"]}]


def test_merge_all_example() -> None:
    a = study("1.2", StudyDescription=attr("LO"), ModalitiesInStudy=attr("CS", "CT"),
              NumberOfStudyRelatedInstances=attr("IS", "10"), NumberOfStudyRelatedSeries=attr("IS", 2))
    b = study("1.2", StudyDescription=attr("LO", "Chest"), AccessionNumber=attr("SH", "A1"),
              ModalitiesInStudy=attr("CS", "MR", "CT"), NumberOfStudyRelatedInstances=attr("IS", 7),
              NumberOfStudyRelatedSeries=attr("IS", "3"), SOPClassesInStudy=attr("UI", "1.2.840.1"))
    c = study("1.2", StudyDescription=attr("LO", "Other"), ModalitiesInStudy=attr("CS", "US"))
    before = copy.deepcopy([a, b, c])
    [merged] = merge(Level.STUDY, Dedup.MERGE_ALL, [("c", 2, [c]), ("a", 0, [a]), ("b", 1, [b])])
    assert merged["nodes"] == ["a", "b", "c"]
    ds = merged["dataset"]
    assert ds[tag("StudyDescription")] == attr("LO", "Chest")  # first non-empty in priority order
    assert ds[tag("AccessionNumber")] == attr("SH", "A1")
    assert ds[MODALITIES] == attr("CS", "CT", "MR", "US")
    assert ds[tag("SOPClassesInStudy")] == attr("UI", "1.2.840.1")
    assert ds[N_INSTANCES] == attr("IS", "10")  # the largest, not 17
    assert ds[N_SERIES] == attr("IS", "3")
    assert [a, b, c] == before


def test_duplicates_within_one_node_count_once() -> None:
    first = study("1.2", StudyDescription=attr("LO", "first"), NumberOfStudyRelatedSeries=attr("IS", "1"))
    second = study("1.2", StudyDescription=attr("LO", "second"), NumberOfStudyRelatedSeries=attr("IS", "9"))
    other = study("1.2", AccessionNumber=attr("SH", "X"))
    [merged] = merge(Level.STUDY, Dedup.MERGE_ALL, [("a", 0, [first, second]), ("b", 0, [other])])
    assert merged["nodes"] == ["a", "b"]
    assert merged["dataset"][tag("StudyDescription")] == attr("LO", "first")
    assert merged["dataset"][N_SERIES] == attr("IS", "1")
    [alone] = merge(Level.STUDY, Dedup.MERGE_ALL, [("a", 0, [first, second])])
    assert alone == {"dataset": first, "nodes": ["a"]}


def test_keyless_matches_are_kept_not_merged() -> None:
    nokey = study(None, StudyDescription=attr("LO", "?"))
    merged = merge(Level.STUDY, Dedup.MERGE_ALL, [("a", 0, [nokey, nokey]), ("b", 0, [nokey, study("1.2")])])
    assert len(merged) == 4
    assert sorted(m["nodes"][0] for m in merged if STUDY_UID not in m["dataset"]) == ["a", "a", "b"]


def test_sort_newest_first_undated_last_then_key() -> None:
    def dated(uid: str, date: str | None, time: str | None = None) -> MergedMatch:
        ds = study(uid)
        if date is not None:
            ds[STUDY_DATE] = attr("DA", date)
        if time is not None:
            ds[STUDY_TIME] = attr("TM", time)
        return {"dataset": ds, "nodes": ["a"]}

    matches = [dated("1.9", None), dated("1.1", "20230101"), dated("1.5", "20240101", "0800"),
               dated("1.4", "20240101", "08:00:00.5"), dated("1.3", "20240101"),
               dated("1.2", "20240101", "0800"), dated("1.0", "bad")]
    order = [m["dataset"][STUDY_UID]["Value"][0] for m in sort_matches(Level.STUDY, matches)]
    assert order == ["1.4", "1.2", "1.5", "1.3", "1.1", "1.0", "1.9"]


def test_patient_level_sorts_by_key() -> None:
    matches: list[MergedMatch] = [{"dataset": {PATIENT_ID: attr("LO", p)}, "nodes": ["a"]} for p in "CAB"]
    ordered = sort_matches(Level.PATIENT, matches)
    assert [m["dataset"][PATIENT_ID]["Value"][0] for m in ordered] == ["A", "B", "C"]


def test_partition_of_is_stable_and_in_range() -> None:
    assert partition_of("1.2.3", 7) == zlib.crc32(b"1.2.3") % 7
    assert partition_of("anything", 1) == 0
    assert all(0 <= partition_of(str(i), 5) < 5 for i in range(100))
    assert len({partition_of(str(i), 4) for i in range(100)}) == 4
    with pytest.raises(ValueError):
        partition_of("x", 0)


def test_split_keeps_copies_of_a_key_together_in_order() -> None:
    matches = [study(f"1.{i % 10}", StudyID=attr("SH", str(i))) for i in range(50)] + [study(None)]
    packed = pack(Level.STUDY, matches)
    parts = split(packed, 3)
    assert sum(len(p) for p in parts) == len(matches)
    for index, part in enumerate(parts):
        datasets = unpack(part)
        assert datasets == [m for m in matches if m in datasets]  # input order kept
        for m in datasets:
            key = identity_key(Level.STUDY, m)
            if key is not None:
                assert partition_of(key, 3) == index
    assert split(packed, 1) == [packed]


def test_page_bounds() -> None:
    merged = merge(Level.STUDY, Dedup.MERGE_ALL, [("a", 0, [study(f"1.{i}") for i in range(10)])])
    assert page(Level.STUDY, [merged], 8, 5) == (10, merged[8:])
    assert page(Level.STUDY, [merged], 20, 5) == (10, [])
    assert page(Level.STUDY, [merged], 0, 0) == (10, [])
    assert page(Level.STUDY, [], 0, None) == (0, [])
    with pytest.raises(ValueError):
        page(Level.STUDY, [merged], -1, None)


def test_node_given_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="more than once"):
        merge(Level.STUDY, Dedup.MERGE_ALL, [("a", 0, []), ("a", 1, [])])


def test_image_level_example() -> None:
    img = {SOP_UID: attr("UI", "1.9"), CONTENT_DATE: attr("DA", "20240101"), CONTENT_TIME: attr("TM", "1200")}
    img2 = {SOP_UID: attr("UI", "1.9"), tag("InstanceNumber"): attr("IS", 3)}
    [merged] = merge(Level.IMAGE, Dedup.MERGE_ALL, [("a", 0, [img]), ("b", 0, [img2])])
    assert merged["dataset"] == {**img, **img2}


def test_page_heads_equals_page() -> None:
    merged = merge(Level.STUDY, Dedup.MERGE_ALL, [("a", 0, [study(f"1.{i}") for i in range(30)])])
    parts = split(pack(Level.STUDY, [m["dataset"] for m in merged]), 3)
    sorted_parts = [merge_top(Level.STUDY, Dedup.MERGE_ALL, [("a", 0, part)])[1] for part in parts]
    for offset, limit in [(0, 5), (7, 9), (25, 10), (0, None), (40, 1)]:
        heads = [head(part, offset, limit) for part in sorted_parts]
        assert page_heads(Level.STUDY, heads, offset, limit) == page(Level.STUDY, sorted_parts, offset, limit)
