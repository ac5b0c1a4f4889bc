"""OHIF's built viewer on a loopback port, its ``dicomweb`` data source pointed at a DICOMweb root.

``make peers`` unpacks the npm package ``@ohif/app`` (its ``dist/``) into ``var/ohif/<version>/``;
``spanner ohif`` serves it for a person (docs/dicomweb-ohif.md), tests/test_ohif.py for Chromium.
OHIF is a single-page app: every path that is not a file answers ``index.html``, so links such as
``/viewer?StudyInstanceUIDs=…`` work on a fresh load. ``/app-config.js`` is generated, never read from disk.
"""

from __future__ import annotations

import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

OHIF_VERSION = "3.13.2"
"""The @ohif/app release scripts/install-peers.sh unpacks (keep the two in step)."""

LOOPBACK = "127.0.0.1"


def default_dist(var_dir: Path = Path("var")) -> Path:
    return var_dir / "ohif" / OHIF_VERSION / "dist"


def app_config(dicomweb_root: str, name: str = "dicom-spanner") -> str:
    """OHIF's ``app-config.js`` with one ``dicomweb`` data source at ``dicomweb_root`` (no trailing slash).

    - ``qidoSupportsIncludeField``: OHIF asks the attributes its study list shows with ``includefield``;
    - ``supportsWildcard``: its text filters become ``*…*`` (QIDO-RS wildcard matching);
    - ``enableStudyLazyLoad``: series metadata is fetched per series as the viewer needs it;
    - ``omitQuotationForMultipartRequest`` false: frames are asked with the standard quoted
      ``multipart/related; type="application/octet-stream"`` Accept;
    - ``imageRendering``/``thumbnailRendering`` ``wadors``: pixels come from ``/frames/``, never from the
      rendered resources, which the spanner does not offer.
    """
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "dicomweb",
        "configuration": {
            "friendlyName": name,
            "name": name,
            "qidoRoot": dicomweb_root,
            "wadoRoot": dicomweb_root,
            "wadoUriRoot": dicomweb_root,
            "qidoSupportsIncludeField": True,
            "supportsReject": False,
            "supportsStow": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": "",
            "bulkDataURI": {"enabled": True},
            "omitQuotationForMultipartRequest": False,
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "dicomweb",
        "dataSources": [source],
    }
    return f"window.config = {json.dumps(config, indent=2)};\n"


_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm",
          ".json": "application/json", ".css": "text/css", ".svg": "image/svg+xml", ".woff2": "font/woff2"}


class OhifHandler(SimpleHTTPRequestHandler):
    """OHIF's files; ``/app-config.js`` from memory; any other path that is no file → ``index.html``."""

    server: OhifHttpServer
    protocol_version = "HTTP/1.1"
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, **_TYPES}

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/app-config.js":
            body = self.server.config_js.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/javascript")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)
            return
        if path != "/" and not (Path(self.directory) / path.lstrip("/")).is_file():
            self.path = "/index.html"
        super().do_GET()


class OhifHttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, dist: Path, config_js: str, port: int = 0,
                 handler: type[OhifHandler] = OhifHandler) -> None:
        if not (dist / "index.html").is_file():
            raise FileNotFoundError(f"no OHIF viewer in {dist}: `make peers` unpacks it")
        self.config_js = config_js

        def handle(*args: Any) -> OhifHandler:
            return handler(*args, directory=str(dist))

        super().__init__((LOOPBACK, port), handle)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.server_address[1]}"


class OhifServer:
    """An ``OhifHttpServer`` in a background thread (for tests); ``configure`` sets the DICOMweb root."""

    def __init__(self, dist: Path, handler: type[OhifHandler] = OhifHandler, port: int = 0) -> None:
        self._server = OhifHttpServer(dist, "", port=port, handler=handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="ohif-static", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return self._server.url

    def configure(self, dicomweb_root: str, name: str = "dicom-spanner") -> None:
        """Serve an app config whose data source points at ``dicomweb_root`` from the next page load on."""
        self._server.config_js = app_config(dicomweb_root, name)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
