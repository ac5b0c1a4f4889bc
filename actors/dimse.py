"""The pynetdicom side of a node actor: the AE, TCP_NODELAY, and errors translated to node errors.

Everything here blocks; the actor runs it in threads. pynetdicom never sets TCP_NODELAY, and
without it every DIMSE message stalls about 40 ms (shared/GUIDE.md), so every socket gets it.
"""

from __future__ import annotations

import socket
from typing import Any

from pydicom.uid import UID
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association

from spanner import reactor
from spanner.errors import AssociationAborted, AssociationRejected, NodeUnreachable
from spanner.nodespec import NodeSpec
from spanner.query import InformationModel

Verification = UID("1.2.840.10008.1.1")
PatientRootQueryRetrieveInformationModelFind = UID("1.2.840.10008.5.1.4.1.2.1.1")
StudyRootQueryRetrieveInformationModelFind = UID("1.2.840.10008.5.1.4.1.2.2.1")

PatientRootQueryRetrieveInformationModelMove = UID("1.2.840.10008.5.1.4.1.2.1.2")
StudyRootQueryRetrieveInformationModelMove = UID("1.2.840.10008.5.1.4.1.2.2.2")

MOVE_MODELS: dict[InformationModel, UID] = {
    InformationModel.PATIENT_ROOT: PatientRootQueryRetrieveInformationModelMove,
    InformationModel.STUDY_ROOT: StudyRootQueryRetrieveInformationModelMove,
}

FIND_MODELS: dict[InformationModel, UID] = {
    InformationModel.PATIENT_ROOT: PatientRootQueryRetrieveInformationModelFind,
    InformationModel.STUDY_ROOT: StudyRootQueryRetrieveInformationModelFind,
}


def set_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: turn Nagle off, and note that TCP got through (see open_association)."""
    event.assoc.spanner_connected = True  # type: ignore[attr-defined]
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


NODELAY_HANDLERS: list[Any] = [(evt.EVT_CONN_OPEN, set_nodelay)]


def quiet_pynetdicom() -> None:
    """pynetdicom formats every identifier for its INFO log, listened to or not: ~20% of a match's CPU."""
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"  # the "standard" handlers format a line for every PDU, logged or not


def build_ae(spec: NodeSpec) -> AE:
    quiet_pynetdicom()
    reactor.install()  # DUL threads wait on their sockets instead of polling every millisecond
    ae = AE(ae_title=spec.calling_ae_title)
    ae.add_requested_context(Verification)
    for model in spec.query_models:
        ae.add_requested_context(FIND_MODELS[model])
        ae.add_requested_context(MOVE_MODELS[model])
    ae.connection_timeout = spec.connect_timeout_s
    ae.acse_timeout = spec.connect_timeout_s
    ae.dimse_timeout = spec.dimse_timeout_s
    ae.network_timeout = max(60.0, spec.dimse_timeout_s)
    ae.maximum_associations = max(1, spec.max_associations)
    return ae


def open_association(ae: AE, spec: NodeSpec) -> Association:
    """A new established association, or a NodeError saying why not."""
    try:
        assoc = ae.associate(spec.host, spec.port, ae_title=spec.ae_title, evt_handlers=NODELAY_HANDLERS)
    except (OSError, RuntimeError) as exc:
        raise NodeUnreachable(f"cannot connect to {spec.host}:{spec.port}: {exc}", spec.name) from exc
    if assoc.is_established:
        return assoc
    if not getattr(assoc, "spanner_connected", False):
        # pynetdicom reports a refused or timed-out TCP connect as an abort; it is not one.
        raise NodeUnreachable(
            f"cannot connect to {spec.host}:{spec.port} within {spec.connect_timeout_s:g} s "
            "(connection refused or timed out)",
            spec.name,
        )
    if assoc.is_rejected:
        raise AssociationRejected(
            f"{spec.ae_title}@{spec.host}:{spec.port} rejected the association "
            f"(calling AE {spec.calling_ae_title!r}); check both AE titles and that the PACS "
            "knows the spanner",
            spec.name,
        )
    if assoc.is_aborted:
        raise AssociationAborted(f"{spec.host}:{spec.port} aborted the association request", spec.name)
    raise AssociationAborted(
        f"{spec.host}:{spec.port} accepted the connection but no association followed within "
        f"{spec.connect_timeout_s:g} s",
        spec.name,
    )
