"""Network traffic stays on loopback: every TCP connection of the session's Ray and Serve processes."""

from __future__ import annotations

import os

from tests.conftest import Api
from tests.peers.ports import descendants, off_loopback


def test_the_session_ray_and_serve_talk_only_over_loopback(api: Api) -> None:
    assert api.http.get("/health").status_code == 200
    assert api.http.post("/api/v1/queries", json={"level": "STUDY"}).status_code in (200, 422, 502)
    ours = descendants(os.getpid())
    assert len(ours) > 3, "the session's Ray processes should be children of this test process"
    assert off_loopback(ours | {os.getpid()}) == []
