"""Loop protection (spanner.hops) end to end: the node actors send the hop chain to dicom-spanner peers
only and report a front's loop refusal as ``loop``; a span holding this spanner's own DICOM front, and two
deployments chained A -> B -> A, end at the first repeated hop instead of recursing until the deadline."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage as CT_IMAGE_STORAGE  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from actors.pacs_node import PacsNodeImpl
from scp.server import SpannerScp
from simulator.dataset import generate_fleet
from simulator.scp import SimulatedPacs, SimulatorConfig
from spanner import hops
from spanner.dicom_constants import (
    IMPLEMENTATION_CLASS_UID,
    PATIENT_ROOT_FIND,
    STUDY_ROOT_FIND,
    STUDY_ROOT_MOVE,
    VERIFICATION,
    Status,
)
from spanner.errors import InvalidQuery
from spanner.nodespec import ActorTuning, NodeSpec
from spanner.outcome import OutcomeStatus
from spanner.query import Level, MoveQuery, NodeQuery
from spanner.settings import load_settings
from tests.conftest import Api, migrate

SELF_ID = "LOOP-SELF"


# -- a peer that records what it is sent -----------------------------------------------------------------
@dataclass
class RecordingPeer:
    """A Q/R SCP on loopback that keeps every identifier it receives; ``spanner`` makes it announce
    dicom-spanner's Implementation Class UID, ``refuse`` makes it answer as a front refusing a loop."""

    spanner: bool
    refuse: bool = False
    identifiers: list[Dataset] = field(default_factory=list)
    server: ThreadedAssociationServer | None = None
    destination: ThreadedAssociationServer | None = None  # where a refused C-MOVE's association goes
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> RecordingPeer:
        ae = AE(ae_title="RECORDER")
        if self.spanner:
            ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        for context in (VERIFICATION, STUDY_ROOT_FIND, PATIENT_ROOT_FIND, STUDY_ROOT_MOVE):
            ae.add_supported_context(context)
        ae.add_requested_context(CT_IMAGE_STORAGE)  # a C-MOVE's sub-association to ``destination``
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
            (evt.EVT_C_FIND, self._find), (evt.EVT_C_MOVE, self._move)])
        store = AE(ae_title="DEST")
        store.add_supported_context(CT_IMAGE_STORAGE)
        self.destination = store.start_server(("127.0.0.1", 0), block=False)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.server is not None and self.destination is not None
        self.server.shutdown()
        self.destination.shutdown()

    @property
    def port(self) -> int:
        return port_of(self.server)

    def _keep(self, event: evt.Event) -> Dataset | None:
        with self.lock:
            self.identifiers.append(event.identifier)
        if not self.refuse:
            return None
        status = Dataset()
        status.Status = Status.LOOP_DETECTED
        status.ErrorComment = hops.loop_comment("SOMEWHERE")
        return status

    def _find(self, event: evt.Event) -> Iterator[tuple[Any, Dataset | None]]:
        refusal = self._keep(event)
        yield (refusal if refusal is not None else 0x0000), None

    def _move(self, event: evt.Event) -> Iterator[Any]:
        refusal = self._keep(event)
        if refusal is None:
            yield None, None  # destination unknown: 0xA801, enough to have seen the identifier
            return
        yield "127.0.0.1", port_of(self.destination)
        yield 1
        yield refusal, None


def port_of(server: ThreadedAssociationServer | None) -> int:
    assert server is not None and server.socket is not None
    return int(server.socket.getsockname()[1])


def node_of(peer: RecordingPeer) -> PacsNodeImpl:
    spec = NodeSpec(name="rec", ae_title="RECORDER", host="127.0.0.1", port=peer.port,
                    calling_ae_title="SPANNER", connect_timeout_s=5, dimse_timeout_s=10)
    return PacsNodeImpl(spec, ActorTuning(log_level="WARNING", instance_id=SELF_ID))


def find_and_move(peer: RecordingPeer, chain: tuple[str, ...]) -> list[OutcomeStatus]:
    async def body() -> list[OutcomeStatus]:
        node = node_of(peer)
        try:
            found, _ = await node.find(NodeQuery(Level.STUDY, {"PatientID": "P1"}, hops=chain), 8.0)
            moved = [event async for event in node.move(
                MoveQuery(Level.STUDY, (("StudyInstanceUID", "1.2.3"),), "DEST", hops=chain), 8.0)]
        finally:
            await node.close()
        return [found.status, OutcomeStatus(moved[-1]["status"])]

    return asyncio.run(body())


def private_tags(ds: Dataset) -> list[str]:
    return [str(elem.tag) for elem in ds if elem.tag.is_private]


# -- the node actor --------------------------------------------------------------------------------------
def test_an_archive_never_sees_the_hop_chain() -> None:
    with RecordingPeer(spanner=False) as archive:
        find_and_move(archive, ("UPSTREAM",))
    assert len(archive.identifiers) == 2
    for identifier in archive.identifiers:
        assert private_tags(identifier) == [], identifier
        assert hops.read_hops(identifier) == ()


def test_a_spanner_peer_gets_the_chain_and_this_deployment() -> None:
    with RecordingPeer(spanner=True) as peer:
        find_and_move(peer, ("UPSTREAM",))
    assert [hops.read_hops(identifier) for identifier in peer.identifiers] == [("UPSTREAM", SELF_ID)] * 2
    assert peer.identifiers[0].PatientID == "P1"


def test_a_front_refusing_the_loop_is_the_outcome_loop() -> None:
    with RecordingPeer(spanner=True, refuse=True) as peer:
        assert find_and_move(peer, ()) == [OutcomeStatus.LOOP, OutcomeStatus.LOOP]


def test_the_hops_header_is_bounded() -> None:
    assert hops.parse_header(" A, B ,,C ") == ("A", "B", "C")
    with pytest.raises(InvalidQuery, match="at most 16"):
        hops.parse_header(",".join(f"S{i}" for i in range(17)))
    with pytest.raises(InvalidQuery, match="longer than 64"):
        hops.parse_header("X" * 65)


# -- end to end: the session's API, its own DICOM front, and a second deployment --------------------------
@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatedPacs]:
    with SimulatedPacs(SimulatorConfig(ae_title="LOOPPACS"), generate_fleet(4, 1, 3)[0]) as pacs:
        yield pacs


@pytest.fixture(scope="module")
def front_a(api: Api) -> Iterator[SpannerScp]:
    """The session API's own DICOM front, with the API's instance ID (one deployment)."""
    own_id = hops.instance_id(load_settings(**api.settings))
    front = SpannerScp(load_settings(scp_port=0, scp_span_cache_ttl_s=0.1, instance_id=own_id),
                       base_url=api.base_url)
    front.start()
    yield front
    front.stop()


@pytest.fixture(scope="module")
def deployment_b(api: Api, ray_session: str, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[tuple[Api, SpannerScp]]:
    """A second deployment (its own Serve app, database, actors and instance ID) with its DICOM front."""
    from ray import serve

    from serve_app.app import AppArgs, build_app

    var_dir = tmp_path_factory.mktemp("loop-b")
    url = f"sqlite:///{var_dir}/spanner.db"
    migrate(url)
    namespace = f"{ray_session}-loop-b"
    settings = dict(api.settings) | {"namespace": namespace, "var_dir": str(var_dir), "database_url": url,
                                     "instance_id": "LOOP-B"}
    serve.run(build_app(AppArgs(settings=settings)), name="spanner-loop-b", route_prefix="/loopb")
    client = Api(f"{api.base_url}/loopb", namespace, settings)
    front = SpannerScp(load_settings(scp_port=0, scp_span_cache_ttl_s=0.1, instance_id="LOOP-B"),
                       base_url=client.base_url)
    front.start()
    yield client, front
    front.stop()
    client.http.close()
    serve.delete("spanner-loop-b")


def audited(api: Api, patient_id: str) -> int:
    return len(api.http.get("/api/v1/audit", params={"patient_id": patient_id}).json())


def query(api: Api, **body: Any) -> tuple[int, dict[str, Any]]:
    status, answer = api.query(level="PATIENT", **body)
    return status, dict(answer)


def by_node(answer: dict[str, Any]) -> dict[str, str]:
    return {outcome["node"]: outcome["status"] for outcome in answer["nodes"]}


def test_a_span_holding_its_own_front_answers_loop_at_once(api: Api, sim: SimulatedPacs,
                                                           front_a: SpannerScp) -> None:
    api.add_node("loop-sim", sim.port, ae_title="LOOPPACS")
    api.add_node("loop-self", front_a.port, ae_title="SELFLOOP")
    api.add_span("selfloop", ["loop-sim", "loop-self"], ae_title="SELFLOOP")
    patient = f"LOOP{uuid.uuid4().hex[:8]}*"
    status, answer = query(api, span="selfloop", filters={"PatientID": patient}, timeout_s=30)
    assert status == 200, answer
    assert by_node(answer) == {"loop-sim": "ok", "loop-self": "loop"}, answer
    loop = next(o for o in answer["nodes"] if o["node"] == "loop-self")
    assert loop["dimse_status"] == Status.LOOP_DETECTED and front_a_id(api) in loop["error"]
    assert answer["elapsed_ms"] < 15_000  # not ended by the 30 s deadline: no recursion
    assert audited(api, patient) == 1  # the front refused without asking the API again


def front_a_id(api: Api) -> str:
    return hops.instance_id(load_settings(**api.settings))


def test_two_deployments_chained_back_are_refused_at_the_first_front(
        api: Api, sim: SimulatedPacs, front_a: SpannerScp, deployment_b: tuple[Api, SpannerScp]) -> None:
    b, front_b = deployment_b
    api.add_node("loop-sim", sim.port, ae_title="LOOPPACS")
    api.add_node("to-b", front_b.port, ae_title="BSPAN")
    api.add_span("chain", ["loop-sim", "to-b"], ae_title="CHAIN")
    b.add_node("b-sim", sim.port, ae_title="LOOPPACS")
    b.add_node("back-to-a", front_a.port, ae_title="CHAIN")
    b.add_span("bspan", ["b-sim", "back-to-a"], ae_title="BSPAN")
    patient = f"CHAIN{uuid.uuid4().hex[:8]}*"
    status, answer = query(api, span="chain", filters={"PatientID": patient}, timeout_s=30)
    assert status == 200, answer
    assert by_node(answer) == {"loop-sim": "ok", "to-b": "ok"}, answer
    assert audited(api, patient) == 1  # A's front refused B's query: A was asked once
    assert audited(b, patient) == 1
    (record,) = [r for r in b.http.get("/api/v1/queries").json() if r["patient_id"] == patient]
    assert {o["node"]: o["status"] for o in record["outcomes"]} == {"b-sim": "ok", "back-to-a": "loop"}
    assert front_a_id(api) in next(o["error"] for o in record["outcomes"] if o["node"] == "back-to-a")
