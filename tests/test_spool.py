"""The on-disk instance spool (spanner.spool): size bound, eviction by age, TTL, per-node drop, holds,
and a folder that is not a spool never has its contents deleted. Real Part-10 files on a temp folder."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from spanner.dimse.store import NotPart10
from spanner.spool import MARKER, Spool, SpoolDirectoryRefused, SpoolError, SpoolFull
from tests.peers.instances import write_instance


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="spanner-spool-") as name:
        yield Path(name)


def incoming(spool: Spool, n: int, pixel_bytes: int = 10 * 1024) -> Path:
    return write_instance(spool.incoming, n, pixel_bytes)


def files_in(spool: Spool) -> list[Path]:
    return list(spool.directory.rglob("*.dcm"))


def test_put_get_and_the_size_bound(folder: Path) -> None:
    clock = Clock()
    spool = Spool(folder / "spool", max_bytes=25 * 1024, ttl_s=60, clock=clock)
    first = spool.put("pacs-a", incoming(spool, 1))
    assert spool.get(first.sop_instance_uid) is first
    assert first.path.exists() and not (spool.incoming / "1.dcm").exists()
    assert spool.used_bytes == first.size
    clock.now += 1
    second = spool.put("pacs-b", incoming(spool, 2))
    clock.now += 1
    third = spool.put("pacs-a", incoming(spool, 3))  # the oldest (first) goes to make room
    assert spool.get(first.sop_instance_uid) is None and not first.path.exists()
    assert spool.get(second.sop_instance_uid) is second and spool.get(third.sop_instance_uid) is third
    assert spool.used_bytes == second.size + third.size <= spool.max_bytes
    assert sorted(files_in(spool)) == sorted([second.path, third.path])


def test_too_large_and_full_of_held_instances(folder: Path) -> None:
    spool = Spool(folder / "spool", max_bytes=25 * 1024, ttl_s=60)
    huge = incoming(spool, 9, 40 * 1024)
    with pytest.raises(SpoolFull, match="larger than the whole spool"):
        spool.put("pacs-a", huge)
    assert not huge.exists()
    held = spool.put("pacs-a", incoming(spool, 1))
    with spool.holding(held):
        other = incoming(spool, 2, 20 * 1024)
        with pytest.raises(SpoolFull, match="being handed on"):
            spool.put("pacs-a", other)
        assert not other.exists()
        assert spool.get(held.sop_instance_uid) is held
    spool.put("pacs-a", incoming(spool, 3, 20 * 1024))  # released: now it may go
    assert spool.get(held.sop_instance_uid) is None
    assert len(spool) == 1


def test_ttl_and_drop_by_node(folder: Path) -> None:
    clock = Clock()
    spool = Spool(folder / "spool", max_bytes=1 << 20, ttl_s=60, clock=clock)
    a1 = spool.put("pacs-a", incoming(spool, 1))
    b1 = spool.put("pacs-b", incoming(spool, 2))
    clock.now += 30
    a2 = spool.put("pacs-a", incoming(spool, 3))
    clock.now += 31  # a1, b1 expired; a2 not
    assert spool.get(a1.sop_instance_uid) is None and not a1.path.exists()
    assert spool.expire() == 1 and not b1.path.exists()
    assert spool.get(a2.sop_instance_uid) is a2
    b2 = spool.put("pacs-b", incoming(spool, 4))
    assert spool.drop_node("pacs-a") == 1
    assert spool.get(a2.sop_instance_uid) is None and not a2.path.exists()
    assert spool.get(b2.sop_instance_uid) is b2
    assert spool.used_bytes == b2.size


def test_same_uid_replaces(folder: Path) -> None:
    spool = Spool(folder / "spool", max_bytes=1 << 20, ttl_s=60)
    old = spool.put("pacs-a", incoming(spool, 1))
    new = spool.put("pacs-b", incoming(spool, 1, 20 * 1024))
    assert spool.get(old.sop_instance_uid) is new and new.node == "pacs-b"
    assert spool.used_bytes == new.size and len(files_in(spool)) == 1


def test_a_foreign_folder_is_refused_and_leftovers_are_cleared(folder: Path) -> None:
    (folder / "precious.txt").write_text("not the spanner's")
    with pytest.raises(SpoolDirectoryRefused, match="SPANNER_SPOOL_DIR"):
        Spool(folder, max_bytes=1 << 20, ttl_s=60)
    assert (folder / "precious.txt").read_text() == "not the spanner's"
    spool = Spool(folder / "spool", max_bytes=1 << 20, ttl_s=60)
    spool.put("pacs-a", incoming(spool, 1))
    (spool.incoming / "half.part").write_bytes(b"partial")
    again = Spool(folder / "spool", max_bytes=1 << 20, ttl_s=60)  # a restart: the index is gone
    assert (again.directory / MARKER).exists()
    assert files_in(again) == [] and list(again.incoming.iterdir()) == []


def test_bad_settings_and_bad_files(folder: Path) -> None:
    with pytest.raises(SpoolError, match="size limit"):
        Spool(folder / "spool", max_bytes=0, ttl_s=60)
    with pytest.raises(SpoolError, match="TTL"):
        Spool(folder / "spool", max_bytes=1, ttl_s=0)
    spool = Spool(folder / "spool", max_bytes=1 << 20, ttl_s=60)
    junk = spool.incoming / "junk.part"
    junk.write_bytes(b"x" * 200)
    with pytest.raises(NotPart10):
        spool.put("pacs-a", junk)
    assert spool.used_bytes == 0 and len(spool) == 0


def test_manifests_recall_a_whole_part_until_an_instance_goes_the_ttl_passes_or_the_node_changes(
        folder: Path) -> None:
    clock = Clock()
    spool = Spool(folder / "spool", max_bytes=35 * 1024, ttl_s=60, clock=clock)
    one, two = (spool.put("pacs-a", incoming(spool, n)) for n in (1, 2))
    uids = {one.sop_instance_uid, two.sop_instance_uid}
    assert spool.recall("STUDY|x", "pacs-a") is None
    spool.remember("STUDY|x", "pacs-a", uids)
    assert spool.recall("STUDY|x", "pacs-a") == sorted([one, two], key=lambda e: e.sop_instance_uid)
    assert spool.recall("STUDY|x", "pacs-b") is None  # another node's part is not this one
    spool.put("pacs-b", incoming(spool, 3))
    four = spool.put("pacs-b", incoming(spool, 4))  # evicts the oldest (one): the part is no longer whole
    assert spool.recall("STUDY|x", "pacs-a") is None
    spool.remember("STUDY|y", "pacs-b", {four.sop_instance_uid})
    clock.now += 61
    assert spool.recall("STUDY|y", "pacs-b") is None  # the TTL passed
    three = spool.put("pacs-b", incoming(spool, 5))
    spool.remember("STUDY|z", "pacs-b", {three.sop_instance_uid})
    assert spool.recall("STUDY|z", "pacs-b") == [three]
    spool.drop_node("pacs-b")
    assert spool.recall("STUDY|z", "pacs-b") is None
