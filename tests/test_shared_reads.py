"""Shared reads (serve_app.shared_reads), as planning uses them for spans: a query shares a read of its
span only when the read began after the query arrived, so a change committed before a query arrived is
always in its plan."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from serve_app.admission import Admission
from serve_app.shared_reads import SharedReads
from spanner.schemas import ALL_SPAN, NodeIn, NodeOut, NodePatch, SpanOut
from spanner.storage import Repository, make_engine
from tests.conftest import migrate

SpanRead = tuple[SpanOut, list[NodeOut]]


class CountingRepository(Repository):
    """The real repository on SQLite; each span read is counted and held until ``release`` is set, so
    the test decides which queries arrive while a read is in flight."""

    def __init__(self, url: str) -> None:
        migrate(url)
        super().__init__(make_engine(url))
        self.ensure_default_span()  # the built-in span "all", as the app creates it
        self.reads = 0
        self.release = threading.Event()

    def span_for_query(self, span_name: str) -> SpanRead:
        self.reads += 1
        self.release.wait(5.0)
        return super().span_for_query(span_name)


def test_queries_that_arrived_before_a_read_began_share_it_and_later_ones_read_again(tmp_path: Path) -> None:
    repo = CountingRepository(f"sqlite:///{tmp_path / 'spanner.db'}")
    repo.create_node(NodeIn(name="a", ae_title="A", host="127.0.0.1", port=11112))
    reads = SharedReads(repo.span_for_query)

    async def scenario() -> tuple[list[SpanRead], SpanRead]:
        early = time.monotonic()
        first = [asyncio.ensure_future(reads.get(ALL_SPAN, early)) for _ in range(20)]
        await asyncio.sleep(0.05)  # the read has begun, after the 20 arrived: they share it
        repo.patch_node("a", NodePatch(port=11113))  # committed now, while that read is held
        late = asyncio.ensure_future(reads.get(ALL_SPAN, time.monotonic()))  # arrived after the change
        await asyncio.sleep(0.05)
        repo.release.set()
        return await asyncio.gather(*first), await late

    shared, fresh = asyncio.run(scenario())
    assert repo.reads == 2  # one for the twenty, one for the query that arrived after the change
    assert all(read is shared[0] for read in shared)
    assert fresh[1][0].port == 11113


def test_a_short_deadline_on_an_idle_replica_runs() -> None:
    """A reserve of a third of a 0.5 s deadline, 0.1 s of it gone in planning: it still runs."""
    async def scenario() -> float:
        admission = Admission(max_active=4, max_waiting=4)
        async with admission.slot(0.5, time.monotonic() - 0.1, reserve_s=0.5 / 3) as left:
            return left

    assert 0.3 < asyncio.run(scenario()) <= 0.4
