"""The DIMSE side of a node actor: associations of the spanner's engine (``spanner.dimse``), the
presentation contexts a node is asked for, and engine errors translated to node errors at this boundary.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from spanner import dimse, hops
from spanner.dicom_constants import (
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    PATIENT_ROOT_FIND,
    PATIENT_ROOT_GET,
    PATIENT_ROOT_MOVE,
    STUDY_ROOT_FIND,
    STUDY_ROOT_GET,
    STUDY_ROOT_MOVE,
    VERIFICATION,
)
from spanner.dimse import errors as engine
from spanner.dimse.association import Association, connect
from spanner.errors import AssociationAborted, AssociationRejected, DimseFailure, NodeError, NodeUnreachable
from spanner.nodespec import NodeSpec
from spanner.query import InformationModel

__all__ = ["FIND_MODELS", "GET_MODELS", "MOVE_MODELS", "Association", "EncodedQueries", "Marked", "encoder",
           "identifier_for", "marked", "node_error", "open_association"]

FIND_MODELS: dict[InformationModel, str] = {
    InformationModel.PATIENT_ROOT: PATIENT_ROOT_FIND,
    InformationModel.STUDY_ROOT: STUDY_ROOT_FIND,
}
MOVE_MODELS: dict[InformationModel, str] = {
    InformationModel.PATIENT_ROOT: PATIENT_ROOT_MOVE,
    InformationModel.STUDY_ROOT: STUDY_ROOT_MOVE,
}
GET_MODELS: dict[InformationModel, str] = {
    InformationModel.PATIENT_ROOT: PATIENT_ROOT_GET,
    InformationModel.STUDY_ROOT: STUDY_ROOT_GET,
}
TRANSFER_SYNTAXES = (EXPLICIT_VR_LE, IMPLICIT_VR_LE)
assert dimse  # the engine package is documented in its __init__


def contexts_for(spec: NodeSpec) -> list[tuple[str, tuple[str, ...]]]:
    proposed: list[tuple[str, tuple[str, ...]]] = [(VERIFICATION, TRANSFER_SYNTAXES)]
    for model in spec.query_models:
        proposed += [(FIND_MODELS[model], TRANSFER_SYNTAXES), (MOVE_MODELS[model], TRANSFER_SYNTAXES)]
    return proposed


async def open_association(spec: NodeSpec) -> Association:
    """A new established association, or a NodeError saying why not."""
    try:
        return await connect(
            spec.host, spec.port, calling_ae=spec.calling_ae_title, called_ae=spec.ae_title,
            contexts=contexts_for(spec), connect_timeout_s=spec.connect_timeout_s,
            acse_timeout_s=spec.connect_timeout_s, dimse_timeout_s=spec.dimse_timeout_s,
        )
    except engine.DimseError as exc:
        raise node_error(exc, spec) from exc


def node_error(exc: engine.DimseError, spec: NodeSpec) -> NodeError:
    """An engine error as the node error (and so the outcome) it stands for."""
    where = f"{spec.host}:{spec.port}"
    if isinstance(exc, engine.ConnectFailed):
        return NodeUnreachable(f"cannot connect to {where} within {spec.connect_timeout_s:g} s: {exc}",
                               spec.name)
    if isinstance(exc, engine.AssociationRejected):
        return AssociationRejected(
            f"{spec.ae_title}@{where} rejected the association (calling AE {spec.calling_ae_title!r}; "
            f"result {exc.result}, source {exc.source}, reason {exc.reason}); check both AE titles and "
            "that the PACS knows the spanner", spec.name)
    if isinstance(exc, engine.DimseTimeout):
        return AssociationAborted(f"{where}: {exc}", spec.name)
    if isinstance(exc, engine.NoAcceptedContext):
        return DimseFailure(f"{where}: {exc}", spec.name)
    return AssociationAborted(f"{where}: {exc}", spec.name)


def encoder(identifier: Dataset) -> dimse.association.Identifier:
    """``identifier`` encoded by pydicom once per transfer syntax asked for (one, for one query)."""
    cache: dict[str, bytes] = {}

    def encode(transfer_syntax: str) -> bytes:
        data = cache.get(transfer_syntax)
        if data is None:
            buffer = DicomBytesIO()
            buffer.is_little_endian = True
            buffer.is_implicit_VR = transfer_syntax == IMPLICIT_VR_LE
            write_dataset(buffer, identifier)
            data = cache[transfer_syntax] = buffer.getvalue()
        return data

    return encode


Marked = Callable[[], dimse.association.Identifier]
"""The identifier for a peer that is a dicom-spanner: with the hop chain (built only when one is met)."""


def marked(build: Callable[[], Dataset], chain: Sequence[str]) -> Marked:
    """``build()``'s identifier carrying ``chain`` in its private block (loop protection, spanner.hops)."""

    def make() -> dimse.association.Identifier:
        identifier = build()
        hops.add_hops(identifier, chain)
        return encoder(identifier)

    return make


def identifier_for(assoc: Association, plain: dimse.association.Identifier,
                   for_spanner: Marked | None) -> dimse.association.Identifier:
    """What ``assoc``'s peer is sent: the chain only when its A-ASSOCIATE-AC names a dicom-spanner, so
    archives never see the private block."""
    if for_spanner is not None and hops.is_spanner(assoc.peer_implementation_class_uid):
        return for_spanner()
    return plain


class EncodedQueries:
    """The encoded identifiers of an actor's last ``size`` distinct queries: a query asked again (a
    worklist polled, a page re-read) costs no pydicom Dataset and no encoding (about 0.3 ms each)."""

    def __init__(self, size: int = 128) -> None:
        self._size = size
        self._encoders: OrderedDict[Hashable, dimse.association.Identifier] = OrderedDict()

    def get(self, key: Hashable, build: Callable[[], Dataset]) -> dimse.association.Identifier:
        found = self._encoders.get(key)
        if found is not None:
            self._encoders.move_to_end(key)
            return found
        made = self._encoders[key] = encoder(build())
        if len(self._encoders) > self._size:
            self._encoders.popitem(last=False)
        return made
