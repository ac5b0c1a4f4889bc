"""Merge rules: one entity answered by many PACS becomes one match, whatever order the nodes answered in.

Pure Python on packed node answers (spanner.packed): it runs in Ray tasks over up to a million
matches, so a key seen by one node only is never decoded unless it is on the requested page, and a
page of the first ``stop`` entities is selected without sorting the rest.
Copies of one key are always looked at in (priority, node name) order, which makes every rule
deterministic and lets the result be split by identity key into partitions merged independently.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import itertools
import json
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from typing import Any, TypedDict

from spanner.outcome import DicomJson
from spanner.packed import (
    ORDER_TAGS,
    Packed,
    canonical,
    filled,
    identity_key,
    is_empty,
    order,
    pack,
    select,
)
from spanner.query import Level


class Dedup(StrEnum):
    MERGE_ALL = "merge_all"
    FIRST_WINS = "first_wins"
    MOST_COMPLETE = "most_complete"


@dataclass(frozen=True, slots=True)
class MergeSpec:
    """What a merge is asked besides the answers: the level, the de-duplication rule and the page."""

    level: Level
    dedup: Dedup
    offset: int = 0
    limit: int | None = None
    """None: every merged match from ``offset`` on."""

    def __post_init__(self) -> None:
        page_stop(self.offset, self.limit)  # a negative offset or limit is refused before any work

    @property
    def stop(self) -> int | None:
        """How many merged matches, in order, the page draws from."""
        return page_stop(self.offset, self.limit)


class MergedMatch(TypedDict):
    """One merged entity and the nodes that returned it, in (priority, node name) order."""

    dataset: DicomJson
    nodes: list[str]


# (order: minus the date-time stamp, or spanner.packed.UNDATED; identity key): ascending is newest first.
SortKey = tuple[int, str]
Copy = tuple[str, DicomJson]
# (order, key, ref): a merge entry; ref = node index << 32 | match index, the tie-break of equal keyless.
_Entry = tuple[int, str, int]
_INDEX = (1 << 32) - 1

# ModalitiesInStudy, SOPClassesInStudy: each node may know only some of the values.
UNION_TAGS: tuple[str, ...] = ("00080061", "00080062")
# NumberOf{Patient,Study,Series}Related...: every node counts what it holds; summing would double count.
COUNT_TAGS: tuple[str, ...] = ("00201200", "00201202", "00201204", "00201206", "00201208", "00201209")
_SPECIAL = frozenset(UNION_TAGS + COUNT_TAGS)
# Matches without an identity key sort after every real key (same date) and are never merged.
_KEYLESS_PREFIX = "\U0010ffff"


def _keyless_key(text: str, nodes: Sequence[str]) -> str:
    """A stand-in key from content and nodes: the same in every partition and process, so order is stable."""
    return _KEYLESS_PREFIX + "\x00".join(nodes) + "\x00" + text


def sort_key(level: Level, match: MergedMatch) -> SortKey:
    """Newest first by the level's date and time, undated last, then identity key ascending."""
    ds = match["dataset"]
    key = identity_key(level, ds)
    if key is None:
        key = _keyless_key(canonical(ds), match["nodes"])
    return order(ORDER_TAGS[level], ds), key


def sort_matches(level: Level, matches: Iterable[MergedMatch]) -> list[MergedMatch]:
    return sorted(matches, key=partial(sort_key, Level(level)))


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
    best, best_filled = copies[0][1], filled(copies[0][1])
    for _, ds in copies[1:]:
        count = filled(ds)
        if count > best_filled:
            best, best_filled = ds, count
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
        rank = (2, count) if count is not None else (0 if is_empty(attr) else 1, 0)
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
        elif is_empty(attr):
            empty.add(tag)
    for _, ds in copies[1:]:
        for tag, attr in ds.items():
            if tag in _SPECIAL:
                special.add(tag)
            elif tag not in out:
                out[tag] = attr
                if is_empty(attr):
                    empty.add(tag)
            elif tag in empty and not is_empty(attr):
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


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic collector off while the merge builds its index: it would walk every entry again and
    again (3-4x the merge's time at a million) and finds no cycles here; reference counting frees all."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def merge_top(
    level: Level,
    dedup: Dedup,
    packed_by_node: Iterable[tuple[str, int, Packed]],
    stop: int | None = None,
) -> tuple[int, list[MergedMatch]]:
    """(entities, the first ``stop`` merged matches in ``sort_key`` order; all when ``stop`` is None).

    One match per identity key; keyless matches are kept one by one.
    """
    level, rule = Level(level), _RULES[Dedup(dedup)]
    ordered = sorted(packed_by_node, key=lambda entry: (entry[1], entry[0]))
    names = [entry[0] for entry in ordered]
    if len(set(names)) != len(names):
        raise ValueError(f"a node is given more than once: {names}")
    packs = [entry[2] for entry in ordered]
    for name, packed in zip(names, packs, strict=True):
        if packed.level != level:
            raise ValueError(f"node {name}'s matches are packed for {packed.level}, not {level}")
    with _collector_paused():
        first, more, keyless = _index(packs)
        tags = ORDER_TAGS[level]

        def decoded(refs: list[int]) -> list[Copy]:
            return [(names[ref >> 32], json.loads(packs[ref >> 32].texts[ref & _INDEX])) for ref in refs]

        merged: dict[str, DicomJson] = {}
        entries: list[_Entry] = []
        append = entries.append
        for key, ref in first.items():
            copies = more.get(key)
            if copies is None or rule is _first_wins:
                append((packs[ref >> 32].orders[ref & _INDEX], key, ref))
            elif rule is _most_complete:
                best = max(copies, key=lambda c: packs[c >> 32].filled[c & _INDEX])  # first of the fullest
                append((packs[best >> 32].orders[best & _INDEX], key, ref))
            elif packs[ref >> 32].exact[ref & _INDEX]:  # merge_all keeps the head's date and time
                append((packs[ref >> 32].orders[ref & _INDEX], key, ref))
            else:  # the order may come from a later copy: merge now
                ds = merged[key] = rule(decoded(copies))
                append((order(tags, ds), key, ref))
        for ref in keyless:
            packed = packs[ref >> 32]
            text = packed.texts[ref & _INDEX]
            append((packed.orders[ref & _INDEX], _keyless_key(text, [names[ref >> 32]]), ref))
        total = len(entries)
        if stop is None or stop >= total:
            entries.sort()
            top = entries
        else:
            top = heapq.nsmallest(stop, entries)
        out: list[MergedMatch] = []
        for _order, key, ref in top:
            copies = more.get(key)
            if copies is None:
                ds = json.loads(packs[ref >> 32].texts[ref & _INDEX])
                out.append({"dataset": ds, "nodes": [names[ref >> 32]]})
            else:
                ds = merged[key] if key in merged else rule(decoded(copies))
                out.append({"dataset": ds, "nodes": [names[c >> 32] for c in copies]})
    return total, out


def _index(packs: Sequence[Packed]) -> tuple[dict[str, int], dict[str, list[int]], list[int]]:
    """Per key its first copy and, when other nodes have it too, every node's first copy; keyless refs."""
    first: dict[str, int] = {}
    more: dict[str, list[int]] = {}
    keyless: list[int] = []
    for n, packed in enumerate(packs):
        base = n << 32
        for i, key in enumerate(packed.keys):
            ref = base | i
            if key is None:
                keyless.append(ref)
                continue
            seen = first.setdefault(key, ref)
            if seen != ref and seen >> 32 != n:  # a node that returns one key twice counts its first copy
                copies = more.get(key)
                if copies is None:
                    more[key] = [seen, ref]
                elif copies[-1] >> 32 != n:
                    copies.append(ref)
    return first, more, keyless


def merge(
    level: Level, dedup: Dedup, copies_by_node: Iterable[tuple[str, int, list[DicomJson]]]
) -> list[MergedMatch]:
    """Every merged match, sorted by ``sort_key``; for callers holding datasets rather than packs."""
    level = Level(level)
    packs = [(name, prio, pack(level, matches)) for name, prio, matches in copies_by_node]
    return merge_top(level, dedup, packs)[1]


def partition_of(key: str, partitions: int) -> int:
    """A hash that is the same in every process (Python's hash() is salted per process)."""
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, not {partitions}")
    if partitions == 1:
        return 0
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % partitions


def split(packed: Packed, partitions: int) -> list[Packed]:
    """One node's matches by partition of their identity key, input order kept (so 'first copy' holds)."""
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, not {partitions}")
    if partitions == 1:
        return [packed]
    parts: list[list[int]] = [[] for _ in range(partitions)]
    crc32 = zlib.crc32
    for i, (key, text) in enumerate(zip(packed.keys, packed.texts, strict=True)):
        parts[crc32((text if key is None else key).encode("utf-8", "surrogatepass")) % partitions].append(i)
    return [select(packed, indices) for indices in parts]


def page_stop(offset: int, limit: int | None) -> int | None:
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
    stop = page_stop(offset, limit)
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
    stop = page_stop(offset, limit)
    return sum(count for count, _ in heads), _slice(level, [head for _, head in heads], offset, stop)


def head(matches: list[MergedMatch], offset: int, limit: int | None) -> tuple[int, list[MergedMatch]]:
    """(size, first offset+limit matches) of one sorted partition: its share of any page up to there."""
    stop = page_stop(offset, limit)
    return len(matches), matches if stop is None else matches[:stop]
