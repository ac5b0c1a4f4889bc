"""The engine's exceptions (httpx style: the hierarchy first, lower-layer errors mapped at the boundary).

    DimseError
    ├── ConnectFailed          TCP connect refused or timed out
    ├── AssociationRejected    A-ASSOCIATE-RJ (result, source, reason)
    ├── AssociationAborted     A-ABORT or A-P-ABORT, or the connection closed mid-association
    ├── ProtocolError          the peer sent something malformed or out of place (we abort)
    ├── DimseTimeout           no message within the DIMSE / ACSE timeout
    └── NoAcceptedContext      no accepted presentation context for the SOP class asked for
"""

from __future__ import annotations


class DimseError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConnectFailed(DimseError):
    pass


class AssociationRejected(DimseError):
    def __init__(self, message: str, result: int = 1, source: int = 1, reason: int = 1) -> None:
        super().__init__(message)
        self.args = (message, result, source, reason)
        self.result, self.source, self.reason = result, source, reason


class AssociationAborted(DimseError):
    pass


class ProtocolError(DimseError):
    pass


class DimseTimeout(DimseError):
    pass


class NoAcceptedContext(DimseError):
    pass
