"""Conformance of the DIMSE engine (spanner.dimse) against peers nobody here wrote.

- the engine as SCU against Orthanc, dcmtk's dcmqrscp and a pynetdicom SCP: every level and model,
  non-ASCII character sets, responses split over many PDUs, small maximum PDU sizes, abort mid-stream,
  association rejected, C-CANCEL;
- the engine as SCP (the lean simulator) against dcmtk's echoscu and findscu;
- garbage and truncated PDUs (300 seeded cases) end that association only: the listener keeps serving.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt

from actors.dicom_json import from_bytes
from actors.dimse import encoder
from simulator.dataset import generate_uniform
from simulator.scp import SimulatorConfig, enable_nodelay
from simulator.wire import WireSimulatedPacs
from spanner.dicom_constants import (
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    PATIENT_ROOT_FIND,
    STUDY_ROOT_FIND,
    VERIFICATION,
    Status,
)
from spanner.dimse.association import Association, Response, connect
from spanner.dimse.errors import AssociationAborted, AssociationRejected, ConnectFailed
from spanner.dimse.pdu import AssociateRequest, ProposedContext, UserInformation
from tests.conftest import require
from tests.peers.orthanc import OrthancPeer, make_instance, orthanc_executable
from tests.peers.ports import free_port, wait_for_port

ROOT = "1.2.826.0.1.3680043.8.498.9931"
S1, S2, S3 = (f"{ROOT}.{n}" for n in (1, 2, 3))
MULLER, GERARD, YAMADA = "Müller^Jürgen", "Gérard^Zoë", "山田^太郎"
INSTANCES = [  # (patient ID, name, study, series, SOP instance, charset)
    ("PID1", MULLER, S1, f"{S1}.1", f"{S1}.1.1", "ISO_IR 192"),
    ("PID1", MULLER, S1, f"{S1}.1", f"{S1}.1.2", "ISO_IR 192"),
    ("PID1", MULLER, S1, f"{S1}.2", f"{S1}.2.1", "ISO_IR 192"),
    ("PID2", GERARD, S2, f"{S2}.1", f"{S2}.1.1", "ISO_IR 100"),
    ("PID3", YAMADA, S3, f"{S3}.1", f"{S3}.1.1", "ISO_IR 192"),
]
ALL_CONTEXTS = [(VERIFICATION, (IMPLICIT_VR_LE,)), (STUDY_ROOT_FIND, (EXPLICIT_VR_LE, IMPLICIT_VR_LE)),
                (PATIENT_ROOT_FIND, (IMPLICIT_VR_LE, EXPLICIT_VR_LE))]


def part10_files() -> list[bytes]:
    return [make_instance(pid, name, study, series, sop, SpecificCharacterSet=charset)
            for pid, name, study, series, sop, charset in INSTANCES]


def identifier(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = level
    for keyword in ("PatientID", "PatientName"):
        setattr(ds, keyword, keys.pop(keyword, ""))
    if level != "PATIENT":
        ds.StudyInstanceUID = keys.pop("StudyInstanceUID", "")
    if level in ("SERIES", "IMAGE"):
        ds.SeriesInstanceUID = keys.pop("SeriesInstanceUID", "")
    if level == "IMAGE":
        ds.SOPInstanceUID = ""
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


async def find_all(assoc: Association, model: str, ds: Dataset, msg_id: int = 1) -> list[Response]:
    return [r async for r in assoc.find(model, encoder(ds), msg_id)]


def matches(responses: list[Response]) -> list[dict[str, Any]]:
    assert responses and responses[-1].status == Status.SUCCESS, [hex(r.status) for r in responses]
    return [from_bytes(r.identifier or b"", r.implicit) for r in responses if r.pending]


def names(found: list[dict[str, Any]]) -> set[str]:
    return {m["00100010"]["Value"][0]["Alphabetic"] for m in found if m.get("00100010", {}).get("Value")}


# -- archives nobody here wrote ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def orthanc() -> Iterator[OrthancPeer]:
    require(orthanc_executable() is not None, "Debian's orthanc")
    peer = OrthancPeer(aet="ENGINE_ORTHANC", default_encoding="Utf8",
                       extra_config={"StorageAccessOnFind": "Never"})
    with peer:
        peer.upload_many(part10_files())
        yield peer


@pytest.fixture(scope="module")
def dcmqrscp() -> Iterator[int]:
    """dcmtk's Q/R SCP over an index built with dcmqridx; maximum PDU 4096 (our requests fragment)."""
    require(shutil.which("dcmqrscp") is not None and shutil.which("dcmqridx") is not None, "dcmtk dcmqrscp")
    with tempfile.TemporaryDirectory(prefix="dcmqrscp-") as workdir:
        db = Path(workdir) / "db"
        db.mkdir()
        files = []
        for i, data in enumerate(part10_files()):
            path = db / f"i{i}.dcm"
            path.write_bytes(data)
            files.append(str(path))
        subprocess.run(["dcmqridx", str(db), *files], check=True, capture_output=True)
        port = free_port()
        config = Path(workdir) / "qr.cfg"
        config.write_text(
            f"NetworkTCPPort = {port}\nMaxPDUSize = 4096\nMaxAssociations = 16\n"
            "HostTable BEGIN\nHostTable END\nVendorTable BEGIN\nVendorTable END\n"
            f"AETable BEGIN\nQRSCP {db} RW (200, 1024mb) ANY\nAETable END\n")
        process = subprocess.Popen(["dcmqrscp", "-c", str(config), str(port)], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env={**os.environ, "TCP_NODELAY": "1"})
        try:
            wait_for_port(port)
            yield port
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


LEVELS = [  # (model, level, keys, expected count)
    (PATIENT_ROOT_FIND, "PATIENT", {}, 3),
    (PATIENT_ROOT_FIND, "STUDY", {"PatientID": "PID1"}, 1),
    (STUDY_ROOT_FIND, "STUDY", {}, 3),
    (STUDY_ROOT_FIND, "SERIES", {"StudyInstanceUID": S1}, 2),
    (STUDY_ROOT_FIND, "IMAGE", {"StudyInstanceUID": S1, "SeriesInstanceUID": f"{S1}.1"}, 2),
]


@pytest.mark.orthanc
@pytest.mark.parametrize(("model", "level", "keys", "count"), LEVELS)
@pytest.mark.parametrize("max_pdu", [4096, 1 << 20])
def test_engine_scu_against_orthanc(orthanc: OrthancPeer, model: str, level: str, keys: dict[str, str],
                                    count: int, max_pdu: int) -> None:
    async def body() -> list[dict[str, Any]]:
        assoc = await connect("127.0.0.1", orthanc.dicom_port, calling_ae="ENGINE", called_ae=orthanc.aet,
                              contexts=ALL_CONTEXTS, max_pdu=max_pdu)
        try:
            assert await assoc.echo() == Status.SUCCESS
            return matches(await find_all(assoc, model, identifier(level, **dict(keys))))
        finally:
            await assoc.release()

    found = asyncio.run(body())
    assert len(found) == count
    if level in ("PATIENT", "STUDY") and not keys:
        assert names(found) == {MULLER, GERARD, YAMADA}  # UTF-8 answers decoded, nothing lost


@pytest.mark.dcmtk
@pytest.mark.parametrize(("model", "level", "keys", "count"), LEVELS)
def test_engine_scu_against_dcmqrscp(dcmqrscp: int, model: str, level: str, keys: dict[str, str],
                                     count: int) -> None:
    async def body() -> list[dict[str, Any]]:
        assoc = await connect("127.0.0.1", dcmqrscp, calling_ae="ENGINE", called_ae="QRSCP",
                              contexts=ALL_CONTEXTS)
        try:
            assert assoc.peer_max_pdu == 4096
            return matches(await find_all(assoc, model, identifier(level, **dict(keys))))
        finally:
            await assoc.release()

    found = asyncio.run(body())
    assert len(found) == count
    if level == "STUDY" and not keys:
        assert names(found) == {MULLER, GERARD, YAMADA}


@pytest.mark.dcmtk
def test_a_request_longer_than_the_peers_maximum_pdu_is_fragmented(dcmqrscp: int) -> None:
    """A UID list of about 11 KB goes to dcmqrscp (maximum PDU 4096) in three PDUs and still matches."""
    uids = "\\".join([S1, S3] + [f"{ROOT}.9.{n}" for n in range(300)])

    async def body() -> list[dict[str, Any]]:
        assoc = await connect("127.0.0.1", dcmqrscp, calling_ae="ENGINE", called_ae="QRSCP",
                              contexts=ALL_CONTEXTS)
        try:
            return matches(await find_all(assoc, STUDY_ROOT_FIND, identifier("STUDY", StudyInstanceUID=uids)))
        finally:
            await assoc.release()

    assert len(uids) > 2 * 4096
    assert names(asyncio.run(body())) == {MULLER, YAMADA}


# -- a pynetdicom SCP that misbehaves on request ------------------------------------------------------------
LONG_COMMENT = "x" * 10000  # one identifier over several PDUs at a small maximum PDU


class PynetdicomScp:
    def __init__(self, maximum_pdu: int, require_calling: list[str] | None = None) -> None:
        self.cancelled = threading.Event()
        ae = AE(ae_title="PYNETDICOM")
        ae.maximum_pdu_size = maximum_pdu
        ae.require_calling_aet = require_calling or []
        for sop in (VERIFICATION, STUDY_ROOT_FIND):
            ae.add_supported_context(sop, [IMPLICIT_VR_LE, EXPLICIT_VR_LE])
        handlers: list[Any] = [(evt.EVT_CONN_OPEN, enable_nodelay), (evt.EVT_C_FIND, self._find)]
        server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        assert server is not None
        self.server = server
        self.port = int(server.server_address[1])

    def _find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        mode = str(event.identifier.get("PatientID", ""))
        for n in range(200 if mode == "SLOW" else 5):
            if event.is_cancelled:
                self.cancelled.set()
                yield 0xFE00, None
                return
            ds = Dataset()
            ds.SpecificCharacterSet = "ISO_IR 192"
            ds.QueryRetrieveLevel = "STUDY"
            ds.PatientName = YAMADA
            ds.StudyInstanceUID = f"{ROOT}.7.{n}"
            ds.PatientComments = LONG_COMMENT if mode == "LONG" else "short"
            yield 0xFF00, ds
            if mode == "ABORT" and n == 1:
                event.assoc.abort()
                return
            if mode == "SLOW":
                time.sleep(0.01)

    def shutdown(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def pynetdicom_scp() -> Iterator[PynetdicomScp]:
    scp = PynetdicomScp(maximum_pdu=1024)
    yield scp
    scp.shutdown()


def run_against(scp: PynetdicomScp, patient_id: str, max_pdu: int = 4096,
                cancel_after: int | None = None) -> tuple[list[Response], BaseException | None]:
    async def body() -> tuple[list[Response], BaseException | None]:
        assoc = await connect("127.0.0.1", scp.port, calling_ae="ENGINE", called_ae="PYNETDICOM",
                              contexts=ALL_CONTEXTS, max_pdu=max_pdu)
        got: list[Response] = []
        try:
            query = encoder(identifier("STUDY", PatientID=patient_id))
            async for response in assoc.find(STUDY_ROOT_FIND, query, msg_id=5):
                got.append(response)
                if cancel_after is not None and len(got) == cancel_after:
                    assoc.cancel(5, STUDY_ROOT_FIND)
        except AssociationAborted as exc:
            return got, exc
        await assoc.release()
        return got, None

    return asyncio.run(body())


@pytest.mark.parametrize("max_pdu", [4096, 256])
def test_responses_over_many_pdus_both_ways(pynetdicom_scp: PynetdicomScp, max_pdu: int) -> None:
    """10 KB identifiers arrive in PDUs of at most ``max_pdu``; the SCP's 1024-byte maximum splits ours."""
    responses, error = run_against(pynetdicom_scp, "LONG", max_pdu=max_pdu)
    assert error is None
    found = matches(responses)
    assert len(found) == 5
    assert all(m["00104000"]["Value"] == [LONG_COMMENT] for m in found)
    assert names(found) == {YAMADA}


def test_abort_mid_stream(pynetdicom_scp: PynetdicomScp) -> None:
    responses, error = run_against(pynetdicom_scp, "ABORT")
    assert isinstance(error, AssociationAborted)
    assert [r.status for r in responses] == [Status.PENDING, Status.PENDING]


def test_c_cancel(pynetdicom_scp: PynetdicomScp) -> None:
    responses, error = run_against(pynetdicom_scp, "SLOW", cancel_after=3)
    assert error is None and pynetdicom_scp.cancelled.is_set()
    assert responses[-1].status == Status.CANCEL and len(responses) < 50


def test_association_rejected() -> None:
    scp = PynetdicomScp(maximum_pdu=0, require_calling=["SOMEONE"])
    try:
        async def body() -> None:
            await connect("127.0.0.1", scp.port, calling_ae="ENGINE", called_ae="PYNETDICOM",
                          contexts=ALL_CONTEXTS)

        with pytest.raises(AssociationRejected) as info:
            asyncio.run(body())
        assert (info.value.result, info.value.source, info.value.reason) == (1, 1, 3)
    finally:
        scp.shutdown()


def test_connection_refused() -> None:
    async def body() -> None:
        await connect("127.0.0.1", free_port(), calling_ae="ENGINE", called_ae="NOBODY",
                      contexts=ALL_CONTEXTS, connect_timeout_s=1)

    with pytest.raises(ConnectFailed):
        asyncio.run(body())


# -- the engine as SCP, against dcmtk's clients ------------------------------------------------------------
@pytest.fixture(scope="module")
def sim() -> Iterator[WireSimulatedPacs]:
    with WireSimulatedPacs(SimulatorConfig(ae_title="ENGINE_SCP"), generate_uniform(4, 0, 300)) as pacs:
        yield pacs


def dcmtk(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    require(shutil.which(tool) is not None, f"dcmtk {tool}")
    return subprocess.run([tool, *args], capture_output=True, text=True, errors="replace", timeout=60,
                          env={**os.environ, "TCP_NODELAY": "1"})


@pytest.mark.dcmtk
def test_echoscu_against_the_engine(sim: WireSimulatedPacs) -> None:
    result = dcmtk("echoscu", "-aec", "ENGINE_SCP", "127.0.0.1", str(sim.port))
    assert result.returncode == 0, result.stderr


@pytest.mark.dcmtk
@pytest.mark.parametrize("options", [[], ["-xe"], ["-xi", "--max-pdu", "4096"]])
@pytest.mark.parametrize(("model", "level"), [("-P", "PATIENT"), ("-S", "STUDY"), ("-S", "SERIES")])
def test_findscu_against_the_engine(sim: WireSimulatedPacs, options: list[str], model: str,
                                    level: str) -> None:
    result = dcmtk("findscu", "-v", model, *options, "-aec", "ENGINE_SCP",
                   "-k", f"QueryRetrieveLevel={level}", "-k", "PatientID", "-k", "StudyInstanceUID",
                   "-k", "SeriesInstanceUID",
                   "127.0.0.1", str(sim.port))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("(Pending)") == 300  # one patient, study and series each
    assert "Received Final Find Response (Success)" in result.stderr


@pytest.mark.dcmtk
def test_findscu_cancel_against_the_engine() -> None:
    """3000 matches: far more than the sockets buffer, so the C-CANCEL arrives while they stream."""
    with WireSimulatedPacs(SimulatorConfig(ae_title="ENGINE_SCP"), generate_uniform(6, 0, 3000)) as big:
        result = dcmtk("findscu", "-v", "-S", "--cancel", "2", "-aec", "ENGINE_SCP",
                       "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", "-k", "PatientName",
                       "127.0.0.1", str(big.port))
        assert result.returncode == 0, result.stderr
        assert "Received Final Find Response (Cancel" in result.stderr, result.stderr[-500:]
        assert result.stderr.count("(Pending)") < 3000
        assert big.counters.cancels == 1


# -- garbage and truncated PDUs ----------------------------------------------------------------------------
def _associate_rq() -> bytes:
    contexts = tuple(ProposedContext(2 * i + 1, sop, ts) for i, (sop, ts) in enumerate(ALL_CONTEXTS))
    return AssociateRequest("ENGINE_SCP", "FUZZER", contexts, UserInformation(16384)).encode()


def _case(rng: random.Random) -> bytes:
    rq = _associate_rq()
    kind = rng.randrange(5)
    if kind == 0:  # noise
        return rng.randbytes(rng.randrange(1, 300))
    if kind == 1:  # a request cut short
        return rq[:rng.randrange(1, len(rq))]
    if kind == 2:  # a request with flipped bytes
        data = bytearray(rq)
        for _ in range(rng.randrange(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if kind == 3:  # a good association, then a P-DATA-TF of noise
        body = rng.randbytes(rng.randrange(0, 64))
        return rq + struct.pack(">BBI", 4, 0, len(body)) + body
    # a good association, then a PDU whose length runs past what is sent
    return rq + struct.pack(">BBI", rng.choice([4, 5, 7, 9]), 0, rng.randrange(10, 1 << 20)) + b"\0" * 4


async def _send(port: int, data: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        writer.write_eof()
        await asyncio.wait_for(reader.read(), 5)  # the engine answers, aborts or closes: never hangs
    except (ConnectionError, TimeoutError):
        pass
    finally:
        writer.close()


def test_garbage_and_truncated_pdus_end_only_their_association(sim: WireSimulatedPacs) -> None:
    rng = random.Random(20261202)
    cases = [_case(rng) for _ in range(300)]

    async def body() -> int:
        for start in range(0, len(cases), 20):
            await asyncio.gather(*(_send(sim.port, data) for data in cases[start:start + 20]))
        assoc = await connect("127.0.0.1", sim.port, calling_ae="ENGINE", called_ae="ENGINE_SCP",
                              contexts=ALL_CONTEXTS)
        try:
            assert await assoc.echo() == Status.SUCCESS
            return len(matches(await find_all(assoc, STUDY_ROOT_FIND, identifier("STUDY"))))
        finally:
            await assoc.release()

    assert asyncio.run(body()) == 300
    deadline = time.monotonic() + 5
    while sim.active_associations and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sim.active_associations == 0


# -- the acceptor's own handler contract --------------------------------------------------------------------
def test_acceptor_streams_a_handlers_results_and_closes_it_on_cancel() -> None:
    from spanner.dimse.acceptor import Acceptor, AcceptorConfig, FindResult, Handlers, Request

    async def body() -> tuple[list[int], bool]:
        finished = asyncio.Event()

        async def on_find(request: Request) -> AsyncIterator[FindResult]:
            try:
                for n in range(10_000):
                    encode = encoder(identifier("STUDY", PatientID=f"P{n}"))
                    assert callable(encode)
                    yield FindResult(Status.PENDING, encode(request.context.transfer_syntax))
            finally:
                finished.set()

        config = AcceptorConfig("HANDLERS", (VERIFICATION, STUDY_ROOT_FIND))
        acceptor = Acceptor(config, Handlers(find=on_find))
        port = await acceptor.start()
        assoc = await connect("127.0.0.1", port, calling_ae="ENGINE", called_ae="HANDLERS",
                              contexts=ALL_CONTEXTS)
        statuses = []
        async for response in assoc.find(STUDY_ROOT_FIND, encoder(identifier("STUDY")), 9):
            statuses.append(response.status)
            if len(statuses) == 3:
                assoc.cancel(9, STUDY_ROOT_FIND)
        await assoc.release()
        await acceptor.close()
        return statuses, finished.is_set()

    statuses, finished = asyncio.run(body())
    assert statuses[-1] == Status.CANCEL and len(statuses) < 10_000 and finished


def test_a_malformed_response_ends_the_requestors_association_only() -> None:
    """An archive that accepts, then answers a C-FIND with garbage: the query ends AssociationAborted
    (the node's ``aborted``), and the engine aborts the association (source: service provider)."""
    from spanner.dimse.pdu import AcceptedContext, AssociateAccept, ContextResult, PduType, read_pdu

    async def body() -> tuple[BaseException | None, bytes]:
        tail: list[bytes] = []

        async def archive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            _, raw = await read_pdu(reader, 0)
            request = AssociateRequest.decode(raw)
            contexts = tuple(AcceptedContext(c.context_id, ContextResult.ACCEPTANCE, IMPLICIT_VR_LE)
                             for c in request.contexts)
            writer.write(AssociateAccept(request.called_ae, request.calling_ae, contexts).encode())
            kind, _ = await read_pdu(reader, 0)
            assert kind == PduType.P_DATA_TF
            writer.write(struct.pack(">BBI", 4, 0, 8) + b"\xff" * 8)  # a PDV longer than its PDU
            tail.append(await reader.read())
            writer.close()

        server = await asyncio.start_server(archive, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        assoc = await connect("127.0.0.1", port, calling_ae="ENGINE", called_ae="BROKEN",
                              contexts=ALL_CONTEXTS)
        error: BaseException | None = None
        try:
            await find_all(assoc, STUDY_ROOT_FIND, identifier("STUDY"))
        except AssociationAborted as exc:
            error = exc
        await assoc.close()
        await asyncio.sleep(0.05)
        server.close()
        return error, b"".join(tail)

    error, tail = asyncio.run(body())
    assert isinstance(error, AssociationAborted) and "malformed" in str(error)
    assert tail.endswith(bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 0]))  # A-ABORT, source 2 (provider)


def test_acceptor_move_handler_reports_suboperations() -> None:
    """C-MOVE on the acceptor: pending results carry sub-operation counts, the final one a failure
    list; the requestor sees the destination it named."""
    from spanner.dicom_constants import STUDY_ROOT_MOVE
    from spanner.dimse.acceptor import Acceptor, AcceptorConfig, Handlers, MoveResult, Request

    destinations: list[str] = []

    async def on_move(request: Request) -> AsyncIterator[MoveResult]:
        destinations.append(request.move_destination)
        for done in range(3):
            yield MoveResult(Status.PENDING, remaining=3 - done, completed=done)
        yield MoveResult(Status.SUBOPERATIONS_FAILED, completed=2, failed=1, comment="one instance failed")

    async def body() -> list[tuple[int, dict[str, int], str | None]]:
        acceptor = Acceptor(AcceptorConfig("MOVER", (STUDY_ROOT_MOVE,)), Handlers(move=on_move))
        port = await acceptor.start()
        assoc = await connect("127.0.0.1", port, calling_ae="ENGINE", called_ae="MOVER",
                              contexts=[(STUDY_ROOT_MOVE, (IMPLICIT_VR_LE,))])
        got = [(r.status, r.suboperations(), r.comment)
               async for r in assoc.move(STUDY_ROOT_MOVE, encoder(identifier("STUDY")), "STORE_HERE", 3)]
        await assoc.release()
        await acceptor.close()
        return got

    got = asyncio.run(body())
    assert destinations == ["STORE_HERE"]
    assert [status for status, _, _ in got] == [Status.PENDING] * 3 + [Status.SUBOPERATIONS_FAILED]
    assert got[1][1] == {"remaining": 2, "completed": 1, "failed": 0, "warning": 0}
    assert got[-1][1]["failed"] == 1 and got[-1][2] == "one instance failed"


def test_the_fragments_of_one_message_stay_on_one_presentation_context() -> None:
    """A data set (or a command fragment) on another context than its command is a protocol error, so
    a handler never reads an identifier in the wrong transfer syntax."""
    from spanner.dimse.errors import ProtocolError
    from spanner.dimse.messages import Assembler, encode_command

    command = encode_command({0x0100: 0x0020, 0x0110: 1, 0x0800: 0x0001})
    identifier = b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY "
    assembler = Assembler()
    assert assembler.feed(_pdv(1, command, 0x03)) == []
    with pytest.raises(ProtocolError, match="presentation context 3"):
        assembler.feed(_pdv(3, identifier, 0x02))

    assembler = Assembler()
    assert assembler.feed(_pdv(1, command[:10], 0x01)) == []
    with pytest.raises(ProtocolError, match="command fragments"):
        assembler.feed(_pdv(3, command[10:], 0x03))

    assembler = Assembler()
    assembler.feed(_pdv(1, command[:10], 0x01) + _pdv(1, command[10:], 0x03))
    [message] = assembler.feed(_pdv(1, identifier, 0x02))
    assert message.context_id == 1 and message.dataset == identifier


def _pdv(context_id: int, payload: bytes, control: int) -> bytes:
    """One PDV item (length, context, control header, fragment) as a P-DATA-TF body holds it."""
    return struct.pack(">IBB", len(payload) + 2, context_id, control) + payload


def test_ae_titles_the_ae_vr_forbids_are_rejected() -> None:
    """A control character, a backslash or a non-ASCII byte in an AE title is refused at association
    time (calling: reason 3, called: reason 7), before any handler could carry it into a log line or
    an HTTP header."""
    from spanner.dimse.acceptor import Acceptor, AcceptorConfig, Handlers

    async def body() -> list[tuple[int, int, int] | None]:
        acceptor = Acceptor(AcceptorConfig("ENGINE_SCP", (VERIFICATION,)), Handlers())
        port = await acceptor.start("127.0.0.1", 0)
        found: list[tuple[int, int, int] | None] = []
        try:
            for calling, called in (("BAD\nAE", "ENGINE_SCP"), ("GOOD", "EN\\GINE"), ("OK", "ENGINE_SCP")):
                try:
                    assoc = await connect("127.0.0.1", port, calling_ae=calling, called_ae=called,
                                          contexts=[(VERIFICATION, (IMPLICIT_VR_LE,))])
                except AssociationRejected as exc:
                    found.append((exc.result, exc.source, exc.reason))
                else:
                    assert await assoc.echo() == 0
                    await assoc.release()
                    found.append(None)
        finally:
            await acceptor.close()
        return found

    assert asyncio.run(body()) == [(1, 1, 3), (1, 1, 7), None]


# -- limits and checks of the acceptor, against a raw peer -------------------------------------------------
async def _raw_association(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An association proposing ALL_CONTEXTS (ids 1 Verification, 3 Study Root, 5 Patient Root)."""
    from spanner.dimse.pdu import PduType, read_pdu

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_associate_rq())
    kind, _ = await asyncio.wait_for(read_pdu(reader, 0), 5)
    assert kind == PduType.ASSOCIATE_AC
    return reader, writer


def _p_data(*pdvs: bytes) -> bytes:
    body = b"".join(pdvs)
    return struct.pack(">BBI", 4, 0, len(body)) + body


def test_an_identifier_larger_than_the_message_limit_aborts_its_association_only() -> None:
    """A peer streaming an endless C-FIND identifier is aborted (A-ABORT, source: provider) once the
    message passes ``message_max_bytes``; the acceptor serves the next association."""
    from spanner.dimse.acceptor import Acceptor, AcceptorConfig, FindResult, Handlers, Request
    from spanner.dimse.messages import encode_command

    async def on_find(request: Request) -> AsyncIterator[FindResult]:
        yield FindResult(Status.SUCCESS)

    async def body() -> tuple[bytes, int]:
        config = AcceptorConfig("ENGINE_SCP", (VERIFICATION, STUDY_ROOT_FIND), message_max_bytes=64 * 1024)
        acceptor = Acceptor(config, Handlers(find=on_find))
        port = await acceptor.start()
        reader, writer = await _raw_association(port)
        command = encode_command({0x0002: STUDY_ROOT_FIND, 0x0100: 0x0020, 0x0110: 1, 0x0800: 0x0001})
        writer.write(_p_data(_pdv(3, command, 0x03)))
        for _ in range(5):  # 80,000 bytes, past the limit with the last PDU; never the last fragment
            writer.write(_p_data(_pdv(3, b"\0" * 16000, 0x00)))
        await writer.drain()
        tail = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assoc = await connect("127.0.0.1", port, calling_ae="ENGINE", called_ae="ENGINE_SCP",
                              contexts=ALL_CONTEXTS)
        echo = await assoc.echo()
        await assoc.release()
        await acceptor.close()
        return tail, echo

    tail, echo = asyncio.run(body())
    assert tail.endswith(bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 0]))  # A-ABORT, source 2 (provider)
    assert echo == Status.SUCCESS


def test_a_request_for_another_sop_class_than_its_context_gets_sop_class_not_supported() -> None:
    """A C-FIND of Study Root sent on the Verification context is answered 0x0122 (its handler would
    read the information model from the context), and the association goes on."""
    from spanner.dimse.acceptor import Acceptor, AcceptorConfig, FindResult, Handlers, Request
    from spanner.dimse.messages import Assembler, encode_command
    from spanner.dimse.pdu import PduType, read_pdu

    async def on_find(request: Request) -> AsyncIterator[FindResult]:
        yield FindResult(Status.SUCCESS)

    async def body() -> list[tuple[int, int | None, str | None]]:
        acceptor = Acceptor(AcceptorConfig("ENGINE_SCP", (VERIFICATION, STUDY_ROOT_FIND)),
                            Handlers(find=on_find))
        port = await acceptor.start()
        reader, writer = await _raw_association(port)
        find = encode_command({0x0002: STUDY_ROOT_FIND, 0x0100: 0x0020, 0x0110: 7, 0x0800: 0x0001})
        ident = b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY "
        writer.write(_p_data(_pdv(1, find, 0x03), _pdv(1, ident, 0x02)))
        echo = encode_command({0x0002: VERIFICATION, 0x0100: 0x0030, 0x0110: 8, 0x0800: 0x0101})
        writer.write(_p_data(_pdv(1, echo, 0x03)))
        got: list[tuple[int, int | None, str | None]] = []
        assembler = Assembler()
        while len(got) < 2:
            kind, raw = await asyncio.wait_for(read_pdu(reader, 0), 5)
            assert kind == PduType.P_DATA_TF
            for message in assembler.feed(raw):
                got.append((message.command.field, message.command.status, message.command.text(0x0002)))
        writer.close()
        await acceptor.close()
        return got

    got = asyncio.run(body())
    assert got == [(0x8020, Status.SOP_CLASS_NOT_SUPPORTED, STUDY_ROOT_FIND),
                   (0x8030, Status.SUCCESS, VERIFICATION)]


def test_role_selection_sub_items_match_pynetdicoms_encoding() -> None:
    """A C-GET requester's role selection must be byte-for-byte what other DICOM stacks send and parse."""
    from pynetdicom.pdu_items import SCP_SCU_RoleSelectionSubItem, UserInformationItem

    from spanner.dimse.pdu import RoleSelection

    ct = "1.2.840.10008.5.1.4.1.1.2"
    theirs = SCP_SCU_RoleSelectionSubItem()
    theirs.sop_class_uid = ct
    theirs.scu_role, theirs.scp_role = False, True
    ours = RoleSelection(ct, scu_role=False, scp_role=True)
    assert ours.encode() == theirs.encode()
    assert RoleSelection.decode(theirs.encode()[4:]) == ours

    info = UserInformation(16384, roles=(ours, RoleSelection("1.2.840.10008.5.1.4.1.1.4", True, True)))
    decoded = UserInformation.decode(info.encode()[4:])
    assert decoded.roles == info.roles and decoded.role_for(ct) == ours and decoded.max_pdu == 16384
    parsed = UserInformationItem()
    parsed.decode(info.encode())
    assert [(r.sop_class_uid, r.scu_role, r.scp_role) for r in parsed.role_selection.values()] == [
        (ct, False, True), ("1.2.840.10008.5.1.4.1.1.4", True, True)]
