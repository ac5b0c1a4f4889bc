"""A bounded on-disk spool of DICOM instances: where retrieved instances wait to be handed on, and a cache.

    spool = Spool(Path("/var/lib/spanner/spool"), max_bytes=20 << 30, ttl_s=3600)
    entry = spool.put(node="pacs-a", path=received_file)   # moves the Part-10 file in; SpoolFull if no room
    spool.get(sop_instance_uid)                             # the entry, or None (absent or expired)
    spool.drop_node("pacs-a")                               # a node changed: what came from it goes
    spool.remember("STUDY|1.2.3", "pacs-a", uids)           # a part arrived whole: its instance list
    spool.recall("STUDY|1.2.3", "pacs-a")                   # the entries, when every one is still here

- Instances are Part-10 files, keyed by SOP Instance UID; each entry remembers the node it came from.
  A second instance with the same UID replaces the first.
- ``max_bytes`` bounds the files' total size. ``put`` first drops expired entries, then the oldest ones,
  until the new file fits; a file larger than the whole spool, or one that would need entries marked
  ``hold`` (being handed on right now) to go, raises ``SpoolFull`` and the file is deleted.
- ``ttl_s``: an entry older than that is gone for ``get`` and is removed by the next ``put`` or ``expire``.
- ``incoming``: a folder inside the spool for files being received (the store SCP's ``store_dir``), so that
  ``put`` is a rename on the same file system. The bytes of files still arriving are not counted: the store
  SCP's per-instance limit bounds each of them.
- Manifests: the instance list of a part that arrived whole (its level and keys, from one node), so that
  a repeated retrieval of the same part is served from the spool without asking the archive. A manifest
  lives as long as the TTL, goes with ``drop_node``, and is worth nothing once one of its instances has
  left the spool. Within the TTL, instances the archive received after the manifest are not seen.
- The folder holds a marker file. A folder that has files but no marker is refused (a mistyped
  SPANNER_SPOOL_DIR never has its contents deleted); with the marker, leftovers of an earlier run are
  deleted at start: the index lives in memory only.

Not thread-safe: one event loop owns a spool.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from spanner.dimse.store import StoredInstance, read_part10

MARKER = ".dicom-spanner-spool"
INCOMING = "incoming"


class SpoolError(Exception):
    """The spool cannot take or give an instance; the message says why and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class SpoolFull(SpoolError):
    pass


class SpoolDirectoryRefused(SpoolError):
    pass


@dataclass(slots=True)
class SpoolEntry:
    node: str
    instance: StoredInstance
    stored_at: float
    hold: int = 0  # > 0: being handed on; never evicted to make room

    @property
    def sop_instance_uid(self) -> str:
        return self.instance.sop_instance_uid

    @property
    def path(self) -> Path:
        return self.instance.path

    @property
    def size(self) -> int:
        return self.instance.size


class Spool:
    def __init__(self, directory: Path, max_bytes: int, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes <= 0:
            raise SpoolError(f"the spool needs a positive size limit, not {max_bytes}")
        if ttl_s <= 0:
            raise SpoolError(f"the spool needs a positive TTL, not {ttl_s:g} s")
        self.directory = directory
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[str, SpoolEntry] = {}  # insertion order = age order (put re-inserts)
        self._manifests: dict[tuple[str, str], tuple[frozenset[str], float]] = {}  # (key, node) -> UIDs
        self.used_bytes = 0
        self._prepare()

    def _prepare(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        marker = self.directory / MARKER
        if not marker.exists():
            if any(self.directory.iterdir()):
                raise SpoolDirectoryRefused(
                    f"{self.directory} is not empty and is not a spanner spool (no {MARKER} file): "
                    f"point SPANNER_SPOOL_DIR at an empty or new folder")
            marker.touch()
        for child in self.directory.iterdir():
            if child.name == MARKER:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        (self.directory / INCOMING).mkdir()

    @property
    def incoming(self) -> Path:
        return self.directory / INCOMING

    def __len__(self) -> int:
        return len(self._entries)

    def _node_dir(self, node: str) -> Path:
        # Node names are free text: the folder is named by a digest, never by the name itself.
        return self.directory / hashlib.sha256(node.encode("utf-8")).hexdigest()[:16]

    def _expired(self, entry: SpoolEntry, now: float) -> bool:
        return now - entry.stored_at >= self.ttl_s

    def put(self, node: str, path: Path) -> SpoolEntry:
        """Move the Part-10 file ``path`` into the spool as an instance from ``node``.

        Raises SpoolFull (the file is deleted) or NotPart10 (the file is left where it is).
        """
        instance = read_part10(path)
        size = instance.size
        if size > self.max_bytes:
            path.unlink(missing_ok=True)
            raise SpoolFull(f"instance {instance.sop_instance_uid} ({size} bytes) is larger than the whole "
                            f"spool ({self.max_bytes} bytes): raise SPANNER_SPOOL_MAX_BYTES")
        self.remove(instance.sop_instance_uid)
        self.expire()
        if self.used_bytes + size > self.max_bytes:
            for entry in [e for e in self._entries.values() if not e.hold]:  # oldest first
                self._drop(entry)
                if self.used_bytes + size <= self.max_bytes:
                    break
        if self.used_bytes + size > self.max_bytes:
            path.unlink(missing_ok=True)
            raise SpoolFull(f"the spool is full ({self.used_bytes} of {self.max_bytes} bytes held by "
                            f"instances being handed on): instance {instance.sop_instance_uid} "
                            f"({size} bytes) does not fit; retry later or raise SPANNER_SPOOL_MAX_BYTES")
        folder = self._node_dir(node)
        folder.mkdir(exist_ok=True)
        target = folder / f"{hashlib.sha256(instance.sop_instance_uid.encode()).hexdigest()[:32]}.dcm"
        os.replace(path, target)
        entry = SpoolEntry(node, StoredInstance(target, instance.sop_class_uid, instance.sop_instance_uid,
                                                instance.transfer_syntax, instance.offset, size),
                           self._clock())
        self._entries[instance.sop_instance_uid] = entry
        self.used_bytes += size
        return entry

    def get(self, sop_instance_uid: str) -> SpoolEntry | None:
        entry = self._entries.get(sop_instance_uid)
        if entry is None:
            return None
        if self._expired(entry, self._clock()) and not entry.hold:
            self._drop(entry)
            return None
        return entry

    @contextlib.contextmanager
    def holding(self, entry: SpoolEntry) -> Iterator[SpoolEntry]:
        """Keep ``entry`` from eviction while it is handed on."""
        entry.hold += 1
        try:
            yield entry
        finally:
            entry.hold -= 1

    def remove(self, sop_instance_uid: str) -> bool:
        entry = self._entries.get(sop_instance_uid)
        if entry is None:
            return False
        self._drop(entry)
        return True

    def expire(self) -> int:
        """Drop every expired entry not on hold; how many went."""
        now = self._clock()
        gone = [e for e in self._entries.values() if self._expired(e, now) and not e.hold]
        for entry in gone:
            self._drop(entry)
        return len(gone)

    def remember(self, key: str, node: str, uids: frozenset[str] | set[str]) -> None:
        """``key`` (a part's level and keys) held exactly ``uids`` at ``node``, all of which are spooled."""
        self._manifests[(key, node)] = (frozenset(uids), self._clock())

    def recall(self, key: str, node: str) -> list[SpoolEntry] | None:
        """The remembered part's entries in UID order, or None when unknown, expired or incomplete."""
        found = self._manifests.get((key, node))
        if found is None:
            return None
        uids, at = found
        entries = [self.get(uid) for uid in sorted(uids)]
        fresh = self._clock() - at < self.ttl_s
        if not fresh or not uids or any(e is None or e.node != node for e in entries):
            del self._manifests[(key, node)]
            return None
        return [e for e in entries if e is not None]

    def drop_node(self, node: str) -> int:
        """Drop everything that came from ``node`` (its settings changed or it was removed)."""
        for key in [k for k in self._manifests if k[1] == node]:
            del self._manifests[key]
        gone = [e for e in self._entries.values() if e.node == node]
        for entry in gone:
            self._drop(entry)
        return len(gone)

    def _drop(self, entry: SpoolEntry) -> None:
        # An open file survives its unlink on POSIX: a sender already reading it finishes.
        if self._entries.get(entry.sop_instance_uid) is entry:
            del self._entries[entry.sop_instance_uid]
            self.used_bytes -= entry.size
        entry.path.unlink(missing_ok=True)

    def clear(self) -> None:
        self._manifests.clear()
        for entry in list(self._entries.values()):
            self._drop(entry)
