"""The Ray merge graph gives what the in-process merge gives, for one partition and for several."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest

from actors.merge_tasks import NodeMeta, merge_inline, merge_refs, merge_task, page_task, split_task
from spanner.merge import Dedup, MergedMatch, MergeSpec
from spanner.outcome import DicomJson
from spanner.packed import Packed, identity_key, pack
from spanner.query import Level


def image(uid: str, rng: random.Random) -> DicomJson:
    """An IMAGE-level match as pydicom's to_json_dict writes one, with a few attributes left empty."""
    ds: DicomJson = {
        "00100020": {"vr": "LO", "Value": [f"P{rng.randrange(1000)}"]},
        "0020000D": {"vr": "UI", "Value": [f"1.2.3.{rng.randrange(5000)}"]},
        "0020000E": {"vr": "UI", "Value": [f"1.2.4.{rng.randrange(20000)}"]},
        "00080018": {"vr": "UI", "Value": [uid]},
        "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
        "00200013": {"vr": "IS", "Value": [rng.randrange(500)]},
        "00080023": {"vr": "DA", "Value": [f"2024{rng.randrange(1, 13):02d}{rng.randrange(1, 29):02d}"]},
        "00080033": {"vr": "TM", "Value": [f"{rng.randrange(24):02d}{rng.randrange(60):02d}00"]},
    }
    if rng.random() < 0.2:
        ds["00200013"] = {"vr": "IS"}
    if rng.random() < 0.05:
        del ds["00080023"]
    if rng.random() < 0.01:
        del ds["00080018"]  # no identity key: kept as it is
    return ds


Answers = tuple[list[NodeMeta], list[Packed]]
Small = tuple[list[NodeMeta], list[Packed], list[Any]]


def answers(total: int, nodes: int, duplicates: float, seed: int = 7) -> Answers:
    """``total`` matches over ``nodes`` nodes; a ``duplicates`` share are copies of a key another node has."""
    rng = random.Random(seed)
    unique = int(total * (1 - duplicates))
    lists: list[list[DicomJson]] = [[] for _ in range(nodes)]
    uids = [f"1.2.826.0.1.{i}" for i in range(unique)]
    for uid in uids:
        lists[rng.randrange(nodes)].append(image(uid, rng))
    for _ in range(total - unique):
        lists[rng.randrange(nodes)].append(image(rng.choice(uids), rng))
    return [(f"node{i:02d}", i % 3) for i in range(nodes)], [pack(Level.IMAGE, matches) for matches in lists]


def run(ref: Any) -> tuple[int, list[MergedMatch]]:
    import ray

    result: tuple[int, list[MergedMatch]] = ray.get(ref, timeout=120)
    return result


@pytest.fixture(scope="module")
def small(ray_session: str) -> Small:
    import ray

    meta, lists = answers(3000, 5, 0.3)
    return meta, lists, [ray.put(matches) for matches in lists]


@pytest.mark.parametrize("partitions", [1, 4])
@pytest.mark.parametrize("dedup", list(Dedup))
def test_merge_refs_equals_merge_inline(
    small: Small, partitions: int, dedup: Dedup
) -> None:
    meta, lists, refs = small
    expected = merge_inline(MergeSpec(Level.IMAGE, dedup), meta, lists)
    assert expected[0] == len(expected[1]) > 2000
    assert run(merge_refs(MergeSpec(Level.IMAGE, dedup), meta, refs, partitions=partitions)) == expected


@pytest.mark.parametrize("partitions", [1, 4])
@pytest.mark.parametrize(
    ("offset", "limit"), [(0, 10), (95, 20), (2095, 1000), (10**6, 5), (7, 0), (2000, None)]
)
def test_offset_limit_and_total(small: Small, partitions: int, offset: int, limit: int | None) -> None:
    meta, lists, refs = small
    total, everything = merge_inline(MergeSpec(Level.IMAGE, Dedup.MERGE_ALL), meta, lists)
    stop = None if limit is None else offset + limit
    expected = (total, everything[offset:stop])
    spec = MergeSpec(Level.IMAGE, Dedup.MERGE_ALL, offset, limit)
    assert merge_inline(spec, meta, lists) == expected
    assert run(merge_refs(spec, meta, refs, partitions=partitions)) == expected


def test_ref_can_be_awaited(small: Small) -> None:
    meta, lists, refs = small

    async def wait() -> tuple[int, list[MergedMatch]]:
        ref = merge_refs(MergeSpec(Level.IMAGE, Dedup.FIRST_WINS, 0, 5), meta, refs, partitions=3)
        result: tuple[int, list[MergedMatch]] = await ref
        return result

    assert asyncio.run(wait()) == merge_inline(MergeSpec(Level.IMAGE, Dedup.FIRST_WINS, 0, 5), meta, lists)


def test_no_nodes_and_empty_answers(ray_session: str) -> None:
    import ray

    assert run(merge_refs(MergeSpec(Level.STUDY, Dedup.MERGE_ALL, 0, 10), [], [], partitions=4)) == (0, [])
    empty: list[Any] = [ray.put(pack(Level.STUDY, [])), ray.put(pack(Level.STUDY, []))]
    spec = MergeSpec(Level.STUDY, Dedup.MERGE_ALL, 0, 10)
    assert run(merge_refs(spec, [("a", 0), ("b", 1)], empty, partitions=4)) == (0, [])


def test_split_task_returns_one_ref_per_partition(ray_session: str) -> None:
    import ray

    _, lists = answers(200, 1, 0.0)
    parts: Any = split_task.options(num_returns=3).remote(Level.IMAGE, 3, ray.put(lists[0]))
    assert len(parts) == 3
    got = ray.get(list(parts))
    assert sum(len(p) for p in got) == 200 and all(got)
    with pytest.raises(ray.exceptions.RayTaskError, match="packed for IMAGE"):
        ray.get(split_task.options(num_returns=2).remote(Level.STUDY, 2, ray.put(lists[0]))[0])
    assert ray.get(page_task.remote(MergeSpec(Level.IMAGE, Dedup.MERGE_ALL))) == (0, [])


def test_bad_arguments_are_refused_before_any_task() -> None:
    with pytest.raises(ValueError):
        merge_refs(MergeSpec(Level.STUDY, Dedup.MERGE_ALL, 0, 10), [("a", 0)], [], partitions=1)
    with pytest.raises(ValueError):
        merge_refs(MergeSpec(Level.STUDY, Dedup.MERGE_ALL, 0, 10), [], [], partitions=0)
    with pytest.raises(ValueError):
        merge_refs(MergeSpec(Level.STUDY, Dedup.MERGE_ALL, -1, 10), [], [], partitions=1)


def test_timing_100k_images_16_nodes(ray_session: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Measured, not asserted: the machine is shared; the numbers go to the report."""
    import ray

    meta, lists = answers(100_000, 16, 0.3)
    started = time.perf_counter()
    inline_total, inline_page = merge_inline(MergeSpec(Level.IMAGE, Dedup.MERGE_ALL, 0, 100), meta, lists)
    inline_s = time.perf_counter() - started
    started = time.perf_counter()
    refs = [ray.put(matches) for matches in lists]
    put_s = time.perf_counter() - started
    timings = {}
    for partitions in (1, 4):
        started = time.perf_counter()
        spec = MergeSpec(Level.IMAGE, Dedup.MERGE_ALL, 0, 100)
        result = run(merge_refs(spec, meta, refs, partitions=partitions))
        timings[partitions] = time.perf_counter() - started
        assert result == (inline_total, inline_page)
    with capsys.disabled():
        print(f"\n100k IMAGE matches, 16 nodes, 30% duplicates -> {inline_total} merged: "
              f"merge_inline {inline_s:.2f} s; ray.put of the lists {put_s:.2f} s; "
              f"merge_refs P=1 {timings[1]:.2f} s, P=4 {timings[4]:.2f} s")


@pytest.mark.parametrize("partitions", [1, 3])
def test_full_partition_tasks_equal_merge_inline(
    small: Small, partitions: int
) -> None:
    """merge_task + page_task (whole partitions) give what merge_refs (heads only) gives."""
    import ray

    meta, lists, refs = small
    split_remote: Any = split_task.options(num_returns=partitions).remote
    # num_returns=1 would hand back one ref of [[matches]]: one partition needs no split.
    splits = [[ref] if partitions == 1 else split_remote(Level.IMAGE, partitions, ref) for ref in refs]
    merge_remote: Any = merge_task.remote
    parts = [merge_remote(MergeSpec(Level.IMAGE, Dedup.MOST_COMPLETE), meta, *[s[i] for s in splits])
             for i in range(partitions)]
    expected = merge_inline(MergeSpec(Level.IMAGE, Dedup.MOST_COMPLETE, 30, 40), meta, lists)
    assert ray.get(page_task.remote(MergeSpec(Level.IMAGE, Dedup.MOST_COMPLETE, 30, 40), *parts)) == expected
    everything = [m for part in ray.get(parts) for m in part]
    assert sorted(identity_key(Level.IMAGE, m["dataset"]) or "" for m in everything) == sorted(
        identity_key(Level.IMAGE, m["dataset"]) or "" for m in merge_inline(
            MergeSpec(Level.IMAGE, Dedup.MOST_COMPLETE), meta, lists)[1])
