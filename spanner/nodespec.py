"""What a node actor needs to know about its PACS: plain, frozen, cheap to pickle into Ray."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from spanner.query import InformationModel


class RetrieveMethod(StrEnum):
    """How an archive gives up its instances to a proxied retrieval."""

    C_MOVE = "c-move"  # the archive C-STOREs to the spanner's storage SCP, which it must know
    C_GET = "c-get"  # the archive C-STOREs back on the node actor's own association


@dataclass(frozen=True, slots=True)
class NodeSpec:
    name: str
    ae_title: str
    host: str
    port: int
    calling_ae_title: str
    priority: int = 100
    max_associations: int = 4
    max_queries_per_s: float | None = None
    connect_timeout_s: float = 5.0
    dimse_timeout_s: float = 30.0
    query_timeout_s: float | None = None
    reuse_associations: bool = True
    query_models: tuple[InformationModel, ...] = (InformationModel.STUDY_ROOT, InformationModel.PATIENT_ROOT)
    additional_filters: tuple[tuple[str, str], ...] = ()
    retrieve_method: RetrieveMethod = RetrieveMethod.C_MOVE
    placement: tuple[tuple[str, str], ...] = ()  # Ray node labels the actor must run on


@dataclass(frozen=True, slots=True)
class ActorTuning:
    """Fleet-wide behaviour of node actors, taken from Settings when the actor is created."""

    circuit_failures: int = 3
    circuit_cooldown_s: float = 15.0
    pool_idle_s: float = 30.0
    cancel_grace_s: float = 1.0
    log_format: str = "json"
    log_level: str = "INFO"
    instance_id: str = ""  # this deployment's, appended to the hop chain sent to dicom-spanner nodes
