"""Merge rules: one entity answered by many PACS becomes one match, whatever order the nodes answered in.

Pure Python on the DICOM JSON model (no pydicom objects): it runs in Ray tasks over up to a million
matches, so the common case (a key seen by one node only) does no copying and no per-attribute work.
Copies of one key are always looked at in (priority, node name) order, which makes every rule
deterministic and lets the result be split by identity key into partitions merged independently.
"""

from __future__ import annotations

import heapq
import itertools
import json
import zlib
from collections.abc import Callable, Iterable, Sequence
from enum import StrEnum
from functools import partial
from operator import itemgetter
from typing import Any, TypedDict

from spanner.outcome import DicomJson
from spanner.query import Level


class Dedup(StrEnum):
    MERGE_ALL = "merge_all"
    FIRST_WINS = "first_wins"
    MOST_COMPLETE = "most_complete"


class MergedMatch(TypedDict):
    """One merged entity and the nodes that returned it, in (priority, node name) order."""

    dataset: DicomJson
    nodes: list[str]


# (0 = dated / 1 = undated, minus the date-time stamp, identity key): ascending is newest first.
SortKey = tuple[int, int, str]
Copy = tuple[str, DicomJson]

# Tags of spanner.query.IDENTITY_KEYS and ORDER_KEYS, written out so nothing is looked up at import.
_PATIENT_ID = "00100020"
_ISSUER_OF_PATIENT_ID = "00100021"
_IDENTITY_TAG: dict[Level, str] = {
    Level.STUDY: "0020000D",
    Level.SERIES: "0020000E",
    Level.IMAGE: "00080018",
}
_ORDER_TAGS: dict[Level, tuple[str, str] | None] = {
    Level.PATIENT: None,
    Level.STUDY: ("00080020", "00080030"),
    Level.SERIES: ("00080021", "00080031"),
    Level.IMAGE: ("00080023", "00080033"),
}
# ModalitiesInStudy, SOPClassesInStudy: each node may know only some of the values.
UNION_TAGS: tuple[str, ...] = ("00080061", "00080062")
# NumberOf{Patient,Study,Series}Related...: every node counts what it holds; summing would double count.
COUNT_TAGS: tuple[str, ...] = ("00201200", "00201202", "00201204", "00201206", "00201208", "00201209")
_SPECIAL = frozenset(UNION_TAGS + COUNT_TAGS)
# A backslash separates values in DICOM, so it never occurs inside one PatientID or issuer value.
KEY_SEPARATOR = "\\"
# Matches without an identity key sort after every real key (same date) and are never merged.
_KEYLESS_PREFIX = "\U0010ffff"


def _first_text(ds: DicomJson, tag: str) -> str | None:
    """The first value of ``tag`` as stripped text, None when absent or empty (inlined in ``merge``)."""
    try:
        value = ds[tag]["Value"][0]
    except (KeyError, IndexError, TypeError):
        return None
    if value.__class__ is not str:
        if value is None:
            return None
        value = str(value)
    return value.strip() or None


def identity_key(level: Level, ds: DicomJson) -> str | None:
    """The key under which copies of one entity are merged; None when the node left it out."""
    if level == Level.PATIENT:
        patient_id = _first_text(ds, _PATIENT_ID)
        if patient_id is None:
            return None
        return patient_id + KEY_SEPARATOR + (_first_text(ds, _ISSUER_OF_PATIENT_ID) or "")
    return _first_text(ds, _IDENTITY_TAG[level])


def _keyless_key(ds: DicomJson, nodes: Sequence[str]) -> str:
    """A stand-in key from content and nodes: the same in every partition and process, so order is stable."""
    return _KEYLESS_PREFIX + "\x00".join(nodes) + "\x00" + json.dumps(ds, sort_keys=True, default=str)


def _stamp(date: Any, time: Any) -> int | None:
    """Date and time as one comparable integer (YYYYMMDDHHMMSSffffff); None without a usable date."""
    date = str(date).strip().replace(".", "").replace("-", "")  # also ACR-NEMA style 2024.01.31
    if len(date) != 8 or not (date.isascii() and date.isdigit()):
        return None
    stamp = int(date) * 1_000_000_000_000
    if time is None:
        return stamp
    main, _, fraction = str(time).strip().replace(":", "").partition(".")
    if not (main.isascii() and main.isdigit()) or len(main) > 6:
        return stamp
    stamp += int(main.ljust(6, "0")) * 1_000_000
    fraction = fraction[:6]
    if fraction.isascii() and fraction.isdigit():
        stamp += int(fraction.ljust(6, "0"))
    return stamp


def _sort_key(tags: tuple[str, str] | None, ds: DicomJson, key: str) -> SortKey:
    """The sort key from the level's (date tag, time tag); runs once per match, hence the fast path."""
    if tags is None:
        return (1, 0, key)
    try:
        date = ds[tags[0]]["Value"][0]
    except (KeyError, IndexError, TypeError):
        return (1, 0, key)
    try:
        time = ds[tags[1]]["Value"][0]
    except (KeyError, IndexError, TypeError):
        time = None
    # What pydicom writes for an 8-digit DA and a 6-digit TM.
    if (
        date.__class__ is str and len(date) == 8 and date.isdigit() and date.isascii()
        and time.__class__ is str and len(time) == 6 and time.isdigit() and time.isascii()
    ):
        return (0, -int(date + time) * 1_000_000, key)
    stamp = None if date is None else _stamp(date, time)
    if stamp is None:
        return (1, 0, key)
    return (0, -stamp, key)


def sort_key(level: Level, match: MergedMatch) -> SortKey:
    """Newest first by the level's date and time, undated last, then identity key ascending."""
    ds = match["dataset"]
    key = identity_key(level, ds)
    if key is None:
        key = _keyless_key(ds, match["nodes"])
    return _sort_key(_ORDER_TAGS[level], ds, key)


def sort_matches(level: Level, matches: Iterable[MergedMatch]) -> list[MergedMatch]:
    return sorted(matches, key=partial(sort_key, Level(level)))


def _is_empty(attr: Any) -> bool:
    """No value at all: no Value (or only empty items) and no inline or bulk binary data."""
    if not isinstance(attr, dict):
        return True
    values = attr.get("Value")
    if values:
        return all(value is None or value == "" for value in values)
    return "InlineBinary" not in attr and "BulkDataURI" not in attr


def _filled(ds: DicomJson) -> int:
    """How many attributes have a value (``_is_empty`` inlined: it runs for every copy of a duplicate)."""
    filled = 0
    for attr in ds.values():
        if attr.__class__ is not dict:
            continue
        values = attr.get("Value")
        if values:
            for value in values:
                if value is not None and value != "":
                    filled += 1
                    break
        elif "InlineBinary" in attr or "BulkDataURI" in attr:
            filled += 1
    return filled


def _count(attr: Any) -> int | None:
    """A NumberOf... value, written as an IS string or an int; None when missing or unreadable."""
    if not isinstance(attr, dict):
        return None
    values = attr.get("Value")
    if not values:
        return None
    value = values[0]
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        try:
            return int(float(str(value)))
        except (ValueError, OverflowError):
            return None


def _first_wins(copies: list[Copy]) -> DicomJson:
    return copies[0][1]


def _most_complete(copies: list[Copy]) -> DicomJson:
    best, best_filled = copies[0][1], _filled(copies[0][1])
    for _, ds in copies[1:]:
        filled = _filled(ds)
        if filled > best_filled:
            best, best_filled = ds, filled
    return best


def _union(tag: str, copies: list[Copy]) -> dict[str, Any] | None:
    """All values of a multi-valued attribute, each once, in order of first appearance in copy order."""
    first_attr: dict[str, Any] | None = None
    union: list[Any] = []
    for _, ds in copies:
        attr = ds.get(tag)
        if attr.__class__ is not dict:
            continue
        if first_attr is None:
            first_attr = attr
        for value in attr.get("Value") or ():
            if value is not None and value != "" and value not in union:
                union.append(value)
    if first_attr is None or not union:
        return first_attr
    return {"vr": first_attr.get("vr", "CS"), "Value": union}


def _largest(tag: str, copies: list[Copy]) -> dict[str, Any] | None:
    """The largest readable count; else the first unreadable value; else the first empty attribute."""
    best_attr: dict[str, Any] | None = None
    best_rank = (-1, 0)
    for _, ds in copies:
        attr = ds.get(tag)
        if attr.__class__ is not dict:
            continue
        count = _count(attr)
        rank = (2, count) if count is not None else (0 if _is_empty(attr) else 1, 0)
        if rank > best_rank:
            best_attr, best_rank = attr, rank
    return best_attr


def _merge_all(copies: list[Copy]) -> DicomJson:
    """The first copy, gaps filled from later copies; value lists unioned; counts take the largest."""
    head = copies[0][1]
    out = dict(head)
    empty: set[str] = set()
    special: set[str] = set()
    for tag, attr in head.items():
        if tag in _SPECIAL:
            special.add(tag)
        elif _is_empty(attr):
            empty.add(tag)
    for _, ds in copies[1:]:
        for tag, attr in ds.items():
            if tag in _SPECIAL:
                special.add(tag)
            elif tag not in out:
                out[tag] = attr
                if _is_empty(attr):
                    empty.add(tag)
            elif tag in empty and not _is_empty(attr):
                out[tag] = attr
                empty.discard(tag)
    if special:
        for tag in UNION_TAGS:
            if tag in special and (attr := _union(tag, copies)) is not None:
                out[tag] = attr
        for tag in COUNT_TAGS:
            if tag in special and (attr := _largest(tag, copies)) is not None:
                out[tag] = attr
    return out


_RULES: dict[Dedup, Callable[[list[Copy]], DicomJson]] = {
    Dedup.FIRST_WINS: _first_wins,
    Dedup.MOST_COMPLETE: _most_complete,
    Dedup.MERGE_ALL: _merge_all,
}


def merge(
    level: Level, dedup: Dedup, copies_by_node: Iterable[tuple[str, int, list[DicomJson]]]
) -> list[MergedMatch]:
    """One match per identity key, sorted by ``sort_key``; keyless matches are kept one by one.

    Input dicts are never mutated; an unmerged match's dataset is the input dict itself.
    """
    level, rule = Level(level), _RULES[Dedup(dedup)]
    ordered = sorted(copies_by_node, key=lambda entry: (entry[1], entry[0]))
    names = [entry[0] for entry in ordered]
    if len(set(names)) != len(names):
        raise ValueError(f"a node is given more than once: {names}")
    first: dict[str, Copy] = {}
    more: dict[str, list[Copy]] = {}
    keyless: list[Copy] = []
    tag = None if level == Level.PATIENT else _IDENTITY_TAG[level]
    for node, _priority, matches in ordered:
        for ds in matches:
            if tag is None:
                key = identity_key(level, ds)
            else:  # _first_text inlined: this loop sees every match
                try:
                    key = ds[tag]["Value"][0]
                except (KeyError, IndexError, TypeError):
                    key = None
                if key.__class__ is not str:
                    key = None if key is None else str(key)
                if key is not None:
                    key = key.strip() or None
            if key is None:
                keyless.append((node, ds))
                continue
            seen = first.get(key)
            if seen is None:
                first[key] = (node, ds)
            elif seen[0] != node:  # a node that returns one key twice contributes its first copy
                copies = more.get(key)
                if copies is None:
                    more[key] = [seen, (node, ds)]
                elif copies[-1][0] != node:
                    copies.append((node, ds))
    tags = _ORDER_TAGS[level]
    keyed: list[tuple[SortKey, MergedMatch]] = []
    append = keyed.append
    for key, (node, ds) in first.items():
        copies = more.get(key)
        if copies is None:
            append((_sort_key(tags, ds, key), {"dataset": ds, "nodes": [node]}))
        else:
            merged = rule(copies)
            append((_sort_key(tags, merged, key), {"dataset": merged, "nodes": [name for name, _ in copies]}))
    for node, ds in keyless:
        append((_sort_key(tags, ds, _keyless_key(ds, [node])), {"dataset": ds, "nodes": [node]}))
    keyed.sort(key=itemgetter(0))
    return [match for _, match in keyed]


def partition_of(key: str, partitions: int) -> int:
    """A hash that is the same in every process (Python's hash() is salted per process)."""
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, not {partitions}")
    if partitions == 1:
        return 0
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % partitions


def split(level: Level, matches: Iterable[DicomJson], partitions: int) -> list[list[DicomJson]]:
    """Matches by partition of their identity key, input order kept (so 'first copy of a node' holds)."""
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, not {partitions}")
    if partitions == 1:
        return [list(matches)]
    level = Level(level)
    parts: list[list[DicomJson]] = [[] for _ in range(partitions)]
    crc32 = zlib.crc32
    for ds in matches:
        key = identity_key(level, ds)
        if key is None:
            key = json.dumps(ds, sort_keys=True, default=str)
        parts[crc32(key.encode("utf-8", "surrogatepass")) % partitions].append(ds)
    return parts


def _window(offset: int, limit: int | None) -> int | None:
    """The stop index of the requested slice; refuses negative offsets and limits."""
    if offset < 0 or (limit is not None and limit < 0):
        raise ValueError(f"offset and limit must not be negative (offset={offset}, limit={limit})")
    return None if limit is None else offset + limit


def _slice(
    level: Level, sorted_partitions: Sequence[Sequence[MergedMatch]], offset: int, stop: int | None
) -> list[MergedMatch]:
    if len(sorted_partitions) == 1:
        return list(sorted_partitions[0][offset:stop])
    merged = heapq.merge(*sorted_partitions, key=partial(sort_key, Level(level)))
    return list(itertools.islice(merged, offset, stop))


def page(
    level: Level,
    sorted_partitions: Sequence[Sequence[MergedMatch]],
    offset: int = 0,
    limit: int | None = None,
) -> tuple[int, list[MergedMatch]]:
    """The total and one slice of the k-way merge of partitions each sorted by ``sort_key``."""
    stop = _window(offset, limit)
    return sum(len(part) for part in sorted_partitions), _slice(level, sorted_partitions, offset, stop)


def page_heads(
    level: Level,
    heads: Sequence[tuple[int, Sequence[MergedMatch]]],
    offset: int = 0,
    limit: int | None = None,
) -> tuple[int, list[MergedMatch]]:
    """``page`` over (partition size, its first offset+limit matches): all a page needs of a partition.

    Shipping only heads between tasks saves serialising whole partitions just to drop most of them.
    """
    stop = _window(offset, limit)
    return sum(count for count, _ in heads), _slice(level, [head for _, head in heads], offset, stop)


def head(matches: list[MergedMatch], offset: int, limit: int | None) -> tuple[int, list[MergedMatch]]:
    """(size, first offset+limit matches) of one sorted partition: its share of any page up to there."""
    stop = _window(offset, limit)
    return len(matches), matches if stop is None else matches[:stop]
