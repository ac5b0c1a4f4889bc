"""Errors of the DICOM front, drawn once here and translated to DIMSE statuses in scp.translate.

HTTP and transport failures of the Serve API are mapped to these at the client boundary
(``raise Mapped(msg) from exc``); the handlers never see an httpx exception.
"""

from __future__ import annotations

from spanner.errors import SpannerError

FRONT_KEY_HINT = ("set SPANNER_SCP_API_KEY to a key of role dicom_front "
                  "(spanner keys create dicom-front --role dicom_front)")

class ScpError(SpannerError):
    """Base of every error of the DICOM front."""


class InvalidIdentifier(ScpError):
    """The request identifier cannot become an API request (DIMSE 0xA900)."""


class UnsupportedRequest(ScpError):
    """A valid request this front does not serve, such as a PATIENT level C-MOVE (DIMSE 0xC0xx)."""


class LoopDetected(ScpError):
    """A dicom-spanner sent a query whose hop chain already holds this deployment (spanner.hops)."""


class ApiError(ScpError):
    """The Serve API did not give a usable answer; ``http_status`` is 0 when it was not reached."""

    def __init__(self, message: str, http_status: int = 0) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.args = (message, http_status)  # pickles with both arguments


class ApiUnreachable(ApiError):
    """Connection refused, reset or timed out: the spanner API is down or unreachable."""


class ApiRejected(ApiError):
    """HTTP 4xx: the API refused the request as it was asked (a bad key, value or level)."""


class ApiFailed(ApiError):
    """HTTP 5xx, a failed spanning query (502) or an answer that cannot be read."""


class SpansUnavailable(ScpError):
    """The span table could not be read, so no association can be accepted right now."""


class KeyRefused(SpansUnavailable):
    """The API answered 401/403 to the front's own API key: nothing a DICOM caller can fix."""


class Abandoned(ScpError):
    """The DICOM client cancelled (C-CANCEL) or left: the HTTP request behind it was closed."""
