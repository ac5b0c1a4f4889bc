"""One exception hierarchy for the whole spanner, drawn here at the top.

Lower-layer errors (the DIMSE engine, SQLAlchemy, Ray) are translated at each boundary with
``raise Mapped(msg) from exc``: DIMSE engine errors -> node errors in the actor, spanner errors -> HTTP
status in the ingress. Every class passes all its constructor arguments to ``super().__init__``
so instances pickle across Ray processes.
"""

from __future__ import annotations


class SpannerError(Exception):
    """Base of every error the spanner raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(SpannerError):
    """Settings or a configuration file are unusable."""


class InvalidQuery(SpannerError):
    """A query's level, keys or values are not valid DICOM (HTTP 422, DIMSE 0xA900)."""


class NotFound(SpannerError):
    """A named node, span or query record does not exist (HTTP 404)."""


class Conflict(SpannerError):
    """A create or update clashes with what exists, such as a duplicate name (HTTP 409)."""


class InvalidConfig(SpannerError):
    """A node or span definition is not acceptable (HTTP 422)."""


class StorageError(SpannerError):
    """The database could not be read or written (HTTP 503)."""


class BrokerUnavailable(SpannerError):
    """RabbitMQ could not be reached or refused an operation; events wait in the outbox meanwhile."""


class NodeError(SpannerError):
    """A PACS node could not answer; ``status`` is the outcome name it maps to."""

    status = "failed"

    def __init__(self, message: str, node: str = "", dimse_status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.node = node
        self.dimse_status = dimse_status
        # Exception.__reduce__ replays self.args: keep all three there so the error pickles.
        self.args = (message, node, dimse_status)


class NodeUnreachable(NodeError):
    """TCP connection to the PACS failed or timed out."""

    status = "refused"


class AssociationRejected(NodeError):
    """The PACS rejected the association (AE titles, contexts, load)."""

    status = "refused"


class AssociationAborted(NodeError):
    """The PACS (or the network) aborted the association mid-operation."""

    status = "aborted"


class DimseFailure(NodeError):
    """The PACS answered a failure status."""

    status = "failed"
