"""The DICOM front of the spanner: a standalone C-ECHO/C-FIND/C-MOVE SCP that forwards to the HTTP API.

The called AE title selects the span. See scp.server.SpannerScp (lifecycle), scp.handlers (events),
scp.translate (DICOM <-> JSON and statuses), scp.client (HTTP) and scp.spans (AE title -> span).
"""

from scp.server import SpannerScp, serve_forever

__all__ = ["SpannerScp", "serve_forever"]
