"""The DICOM front survives what a network sends it: after each kind of abuse a fresh C-ECHO still works."""

from __future__ import annotations

import random
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE

from scp import translate
from scp.server import SpannerScp
from spanner.settings import load_settings
from tests.peers.fake_api import FakeApi, Reply, span

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
SEED = 20240607
CASES = 300


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeApi]:
    api = FakeApi(spans=[span("all", "SPANNER")]).start()
    api.on_query = lambda body: Reply(body={"status": "success", "total": 0, "matches": []})
    yield api
    api.stop()


@pytest.fixture(scope="module")
def front(fake: FakeApi) -> Iterator[SpannerScp]:
    scp = SpannerScp(load_settings(scp_port=0, scp_network_timeout_s=5), base_url=fake.base_url)
    scp.start()
    yield scp
    scp.stop()


def echo_works(port: int) -> bool:
    ae = AE(ae_title="FUZZCHECK")
    ae.add_requested_context(translate.VERIFICATION)
    assoc = ae.associate("127.0.0.1", port, ae_title="SPANNER")
    if not assoc.is_established:
        return False
    ok = int(assoc.send_c_echo().Status) == 0x0000
    assoc.release()
    return ok


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def associate_rq(called: str = "SPANNER", calling: str = "FUZZER") -> bytes:
    """A well-formed A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) proposing Verification."""
    context = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, translate.VERIFICATION.encode())
                    + _item(0x40, IMPLICIT_LE.encode()))
    user = _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.3.4"))
    body = (struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode() + bytes(32)
            + _item(0x10, b"1.2.840.10008.3.1.1.1") + context + user)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def abuse(rng: random.Random) -> list[bytes]:
    """One seeded case: what goes down the socket, in one or more writes."""
    rq = associate_rq()
    kind = rng.randrange(5)
    if kind == 0:  # noise
        return [rng.randbytes(rng.randint(1, 300))]
    if kind == 1:  # a request cut short
        return [rq[: rng.randint(1, len(rq) - 1)]]
    if kind == 2:  # a header that promises more than comes
        header = struct.pack(">BBI", rng.randint(1, 7), 0, rng.randint(1, 1 << 20))
        return [header + rng.randbytes(rng.randint(0, 64))]
    if kind == 3:  # a request with a few bytes flipped
        flipped = bytearray(rq)
        for _ in range(rng.randint(1, 4)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        return [bytes(flipped)]
    # a good request, then a P-DATA-TF that is cut short or noise
    pdata = struct.pack(">BBI", 0x04, 0, 200) + struct.pack(">I", 100) + bytes([1, 0x03]) + rng.randbytes(40)
    broken = pdata[: rng.randint(1, len(pdata))] if rng.random() < 0.5 else rng.randbytes(rng.randint(1, 80))
    return [rq, broken]


def send(port: int, writes: list[bytes]) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.settimeout(0.5)
        for i, data in enumerate(writes):
            try:
                sock.sendall(data)
                if i < len(writes) - 1:
                    sock.recv(4096)  # the A-ASSOCIATE-AC (or RJ) before the next write
            except OSError:  # reset or timed out: the SCP dropped us, which is fine
                return


@pytest.mark.timeout(90)
def test_garbage_and_truncated_pdus_leave_the_scp_serving(front: SpannerScp) -> None:
    rng = random.Random(SEED)
    started = time.monotonic()
    for case in range(CASES):
        send(front.port, abuse(rng))
        if case % 50 == 49:
            assert echo_works(front.port), f"C-ECHO failed after case {case} (seed {SEED})"
    assert echo_works(front.port)
    assert time.monotonic() - started < 60
    deadline = time.monotonic() + 2  # well inside the 30 s ACSE timeout a half-open connection could hold
    while front.active_associations > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert front.active_associations == 0, "abused associations should not linger"


def test_unsupported_sop_class_is_rejected_and_the_scp_keeps_serving(front: SpannerScp) -> None:
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(CT_IMAGE_STORAGE)
    ae.add_requested_context(translate.VERIFICATION)
    assoc = ae.associate("127.0.0.1", front.port, ae_title="SPANNER")
    assert assoc.is_established
    assert [cx.abstract_syntax for cx in assoc.rejected_contexts] == [CT_IMAGE_STORAGE]
    assoc.release()
    only = AE(ae_title="FUZZER")
    only.add_requested_context(CT_IMAGE_STORAGE)
    lone = only.associate("127.0.0.1", front.port, ae_title="SPANNER")
    assert not lone.accepted_contexts
    if lone.is_established:
        lone.release()
    assert echo_works(front.port)


def wrong_vrs() -> list[Dataset]:
    """Identifiers whose elements carry a VR (or a value) their tag does not have."""
    cases = []
    for tag, vr, value in [
        (0x00100010, "US", 1234),  # PatientName as an integer
        (0x00080020, "FD", 3.25),  # StudyDate as a float
        (0x0020000D, "SH", "not a uid*"),  # StudyInstanceUID with a wildcard
        (0x00080020, "DA", "20241399"),  # an impossible date
        (0x00100020, "OB", b"\x00\xff\x10"),  # PatientID as bytes
        (0x00080061, "SQ", [Dataset()]),  # ModalitiesInStudy as a sequence
    ]:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.add_new(tag, vr, value)
        cases.append(ds)
    return cases


def test_identifiers_with_wrong_vrs_get_a_status_and_the_scp_keeps_serving(
    fake: FakeApi, front: SpannerScp
) -> None:
    fake.on_query = lambda body: Reply(422, {"detail": f"rejected {sorted(body['filters'])}"})
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(translate.STUDY_ROOT_FIND, EXPLICIT_LE)
    assoc = ae.associate("127.0.0.1", front.port, ae_title="SPANNER")
    assert assoc.is_established
    for ds in wrong_vrs():
        finals = [int(st.Status) for st, _ in assoc.send_c_find(ds, translate.STUDY_ROOT_FIND)]
        assert finals and finals[-1] in (0x0000, 0xA900), (ds, finals)
    assoc.release()
    assert echo_works(front.port)


def test_undecodable_identifier_bytes_are_a900(fake: FakeApi, front: SpannerScp) -> None:
    """Random bytes under tags whose dictionary VR is a sequence, text or a date: pydicom cannot read them."""
    fake.on_query = lambda body: Reply(body={"status": "success", "total": 0, "matches": []})
    rng = random.Random(SEED)
    tags = [0x00081115, 0x00081032, 0x00100010, 0x00080020, 0x00201208, 0x0020000D]
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(translate.STUDY_ROOT_FIND, IMPLICIT_LE)  # the SCP reads VRs from its dictionary
    assoc = ae.associate("127.0.0.1", front.port, ae_title="SPANNER")
    assert assoc.is_established
    for _ in range(30):
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        for tag in rng.sample(tags, rng.randint(1, 3)):
            ds.add_new(tag, "OB", rng.randbytes(rng.randint(1, 40) * 2))  # raw bytes on the wire
        finals = [int(st.Status) for st, _ in assoc.send_c_find(ds, translate.STUDY_ROOT_FIND)]
        assert finals and finals[-1] in (0x0000, 0xA900), [hex(code) for code in finals]
    assoc.release()
    assert echo_works(front.port)
