"""Loop protection: the chain of dicom-spanner deployments a query has passed through ("hops").

A node may be another dicom-spanner, or this one: a span that reaches itself, directly or through
other spanners, would recurse until its deadline. Each deployment has an instance ID; a query that
one deployment sends to a dicom-spanner node carries the chain so far, and a DICOM front refuses a
query whose chain already holds its own ID.

On the wire:
- A dicom-spanner recognises another by the Implementation Class UID of its A-ASSOCIATE-RQ or -AC
  (``IMPLEMENTATION_CLASS_UID``). Only then does the chain travel, so real archives never see it.
- In a C-FIND or C-MOVE identifier, the chain is a private block: creator ``DICOM-SPANNER HOPS`` in
  group 0009, element xx01 LO holding the instance IDs in order.
- From the DICOM front to the HTTP API it travels as the header ``X-Spanner-Hops`` (IDs separated by
  commas). Neither the ingress nor the node actors use the chain yet (no ID is added when a node actor
  queries a dicom-spanner node), so a loop through the API still ends only at the span's deadline.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Sequence

from pydicom.dataset import Dataset

from spanner.dicom_constants import IMPLEMENTATION_CLASS_UID, Status
from spanner.errors import InvalidQuery
from spanner.settings import Settings

PRIVATE_GROUP = 0x0009
PRIVATE_CREATOR = "DICOM-SPANNER HOPS"
HOPS_ELEMENT = 0x01
HOPS_HEADER = "X-Spanner-Hops"
MAX_HOPS = 16  # a longer chain is a loop whatever it holds
MAX_ID_CHARS = 64  # one value of the LO element that carries the chain
LOOP_COMMENT = "loop:"  # how the ErrorComment of a front's refusal starts, so a spanner tells it apart


def instance_id(settings: Settings) -> str:
    """This deployment's ID: ``instance_id`` if set, else derived from what its processes share."""
    if settings.instance_id:
        return settings.instance_id
    seed = f"{settings.ae_title}|{socket.gethostname()}|{settings.http_port}"
    return hashlib.sha256(seed.encode()).hexdigest()[:12]


def is_spanner(implementation_class_uid: str) -> bool:
    """True when an association's peer announced dicom-spanner's Implementation Class UID."""
    return implementation_class_uid.strip() == IMPLEMENTATION_CLASS_UID


def read_hops(identifier: Dataset) -> tuple[str, ...]:
    """The chain in an identifier's private block (empty when it has none or it is unreadable)."""
    try:
        block = identifier.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        value = block[HOPS_ELEMENT].value
    except (KeyError, ValueError, TypeError):
        return ()
    if isinstance(value, bytes):  # Implicit VR: a private element nobody's dictionary knows arrives as UN
        value = value.decode("ascii", "replace").strip("\0 ").split("\\")
    items = [value] if isinstance(value, str) else list(value or ())
    return tuple(str(item).strip() for item in items if str(item).strip())


def add_hops(identifier: Dataset, hops: Sequence[str]) -> None:
    """Write the chain into an identifier (only for a peer that is a dicom-spanner)."""
    block = identifier.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(HOPS_ELEMENT, "LO", list(hops))


def header_value(hops: Sequence[str]) -> str:
    return ",".join(hops)


def parse_header(value: str) -> tuple[str, ...]:
    """The chain of an ``X-Spanner-Hops`` header; InvalidQuery when it cannot be one."""
    chain = tuple(item.strip() for item in value.split(",") if item.strip())
    if len(chain) > MAX_HOPS:
        raise InvalidQuery(f"{HOPS_HEADER} holds {len(chain)} instance IDs; at most {MAX_HOPS} are allowed")
    too_long = [item for item in chain if len(item) > MAX_ID_CHARS]
    if too_long:
        raise InvalidQuery(f"{HOPS_HEADER}: instance ID {too_long[0][:20]!r}... is longer than "
                           f"{MAX_ID_CHARS} characters")
    return chain


def is_loop(hops: Sequence[str], own_id: str) -> bool:
    return own_id in hops or len(hops) >= MAX_HOPS


def extended(hops: Sequence[str], own_id: str) -> tuple[str, ...]:
    """The chain a query carries on from this deployment to a dicom-spanner node."""
    return (*hops, own_id) if own_id else tuple(hops)


def loop_comment(own_id: str) -> str:
    """The ErrorComment of a front that refuses a query because it already passed this deployment."""
    return f"{LOOP_COMMENT} query already passed dicom-spanner {own_id}"


def is_loop_refusal(status: int | None, comment: str | None) -> bool:
    """True when a dicom-spanner node refused a query as a loop (its front's status and comment)."""
    return status == Status.LOOP_DETECTED and (comment or "").startswith(LOOP_COMMENT)

