"""The DICOM front under idle and greedy peers, and with a key the API refuses."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association

from scp import translate
from scp.server import SpannerScp
from spanner.settings import load_settings
from tests.conftest import require
from tests.peers.fake_api import FakeApi, Reply, span

ARTIM_S = 3.0  # the real clients must be through well before it (two dcmtk processes on a busy machine)
PER_PEER = 8
IDLE_PEER = "127.0.0.2"  # the idle connections come from here; the real clients from 127.0.0.1


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeApi]:
    api = FakeApi(spans=[span("all", "SPANNER")]).start()
    yield api
    api.stop()


@pytest.fixture(scope="module")
def front(fake: FakeApi) -> Iterator[SpannerScp]:
    settings = load_settings(scp_port=0, scp_span_cache_ttl_s=0.1, scp_acse_timeout_s=ARTIM_S,
                             scp_max_connections_per_peer=PER_PEER, scp_network_timeout_s=1.5)
    scp = SpannerScp(settings, base_url=fake.base_url)
    scp.start()
    yield scp
    scp.stop()


def dcmtk(*args: str) -> subprocess.CompletedProcess[str]:
    require(shutil.which(args[0]) is not None, f"dcmtk ({args[0]})")
    return subprocess.run(list(args), capture_output=True, text=True, timeout=30,
                          env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"})


def associate(port: int, source: str = "127.0.0.1") -> Association:
    ae = AE(ae_title="LIMITSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(translate.VERIFICATION)
    return ae.associate("127.0.0.1", port, ae_title="SPANNER", bind_address=(source, 0))


def wait_for(check: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if callable(check) and check():
            return True
        time.sleep(0.05)
    return False


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(64) == b"" or True  # EOF, or an A-ABORT before it: either way the front let go
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_connections_never_starve_others(fake: FakeApi, front: SpannerScp) -> None:
    idle = []
    try:
        for _ in range(40):
            sock = socket.create_connection(("127.0.0.1", front.port), timeout=5,
                                            source_address=(IDLE_PEER, 0))
            idle.append(sock)
        assert wait_for(lambda: front.active_associations >= 40, 2)

        started = time.monotonic()  # real clients from another address go through at once
        echo = dcmtk("echoscu", "-aec", "SPANNER", "127.0.0.1", str(front.port))
        find = dcmtk("findscu", "-S", "-aec", "SPANNER", "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID",
                     "127.0.0.1", str(front.port))
        assert echo.returncode == 0 and find.returncode == 0, echo.stderr + find.stderr
        assert time.monotonic() - started < ARTIM_S, "the real clients waited for the idle ones"

        refused = associate(front.port, source=IDLE_PEER)  # that peer is over its limit
        assert refused.is_rejected
        rj = refused.acceptor.primitive
        assert rj is not None and (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)

        for sock in idle:  # every idle connection is closed by the front once ARTIM expires
            sock.settimeout(ARTIM_S + 3)
            assert closed_by_peer(sock)
        assert wait_for(lambda: front.active_associations == 0, 2)
    finally:
        for sock in idle:
            sock.close()
    again = associate(front.port, source=IDLE_PEER)
    assert again.is_established
    again.release()


def test_an_idle_association_is_aborted_after_the_network_timeout(front: SpannerScp) -> None:
    assoc = associate(front.port)
    assert assoc.is_established
    assert wait_for(lambda: assoc.is_aborted, 5), "the front kept an idle association open"
    assert wait_for(lambda: front.active_associations == 0, 2)


def test_a_refused_api_key_is_said_in_the_log_and_the_rejection(
    fake: FakeApi, front: SpannerScp, caplog: pytest.LogCaptureFixture
) -> None:
    assert front.spans is not None
    fake.spans_reply = Reply(401, {"detail": "invalid API key"})
    front.spans.invalidate()
    try:
        with caplog.at_level(logging.ERROR, logger="scp.handlers"):
            echo = dcmtk("echoscu", "-aec", "SPANNER", "127.0.0.1", str(front.port))
        assert echo.returncode != 0
        assert "Rejected Transient" in echo.stderr and "Service User" in echo.stderr, echo.stderr
        assert "Local Limit Exceeded" not in echo.stderr
        assert any("refused the DICOM front's API key (HTTP 401" in r.getMessage() for r in caplog.records)
    finally:
        fake.spans_reply = None
        front.spans.invalidate()


def test_a_key_refused_during_a_query_fails_it_with_a_comment(
    fake: FakeApi, front: SpannerScp, caplog: pytest.LogCaptureFixture
) -> None:
    fake.on_query = lambda body: Reply(403, {"detail": "this key may not query"})
    ae = AE(ae_title="LIMITSCU")
    ae.add_requested_context(translate.STUDY_ROOT_FIND)
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = ""
    try:
        with caplog.at_level(logging.ERROR, logger="scp.handlers"):
            assoc = ae.associate("127.0.0.1", front.port, ae_title="SPANNER")
            assert assoc.is_established
            statuses = [st for st, _ in assoc.send_c_find(ds, translate.STUDY_ROOT_FIND)]
            assoc.release()
        assert [int(st.Status) for st in statuses] == [translate.API_ERROR]
        assert statuses[0].ErrorComment == "this key may not query"
        assert any("refused the DICOM front's API key (HTTP 403" in r.getMessage() for r in caplog.records)
    finally:
        fake.on_query = FakeApi().on_query
