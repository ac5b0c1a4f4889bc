"""OHIF 3 in Debian's Chromium, headless, pointed at a DICOMweb base URL: the viewer as a test peer.

- ``viewer_studies``: two small studies with real pixel data, one split across two archives (CT on one,
  MR on the other) and one held by the first archive only;
- ``cli.ohif.OhifServer`` (re-exported): the ``dist/`` folder of the npm package ``@ohif/app`` (installed
  by scripts/install-peers.sh into var/ohif/) on a free loopback port, with an ``app-config.js`` whose
  ``dicomweb`` data source points at the DICOMweb server under test; ``proxy_handler`` adds a reverse proxy
  of a reference server's root on the viewer's origin (only for one that answers no CORS preflight, such
  as Orthanc's plugin);
- ``Viewer``: Playwright (its Python package, which carries the Node driver, ``playwright-core``) driving
  ``/usr/bin/chromium``: never a browser downloaded by Playwright. Every request off loopback is aborted
  before it leaves, and every request under the DICOMweb base URL is recorded with its status.
"""

from __future__ import annotations

import http.client
import math
import os
import shutil
import struct
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from pydicom import uid as uids
from pydicom.dataset import Dataset

from cli.ohif import OHIF_VERSION as OHIF_VERSION  # re-exported: the test takes the viewer's parts from here
from cli.ohif import OhifHandler, default_dist
from cli.ohif import OhifServer as OhifServer
from simulator.dataset import make_uid
from tests.peers.ports import LOOPBACK, ClosedPort

if TYPE_CHECKING:
    from playwright.sync_api import Page, Request

REPO = Path(__file__).resolve().parents[2]
OHIF_DIST = default_dist(REPO / "var")

CHROMIUM_ARGS = (
    "--no-sandbox",  # the tests run as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-domain-reliability",
    "--metrics-recording-only",
    "--no-pings",
    # No host name resolves: whatever Chromium itself would fetch (not the page) cannot leave the machine.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    # Cornerstone3D draws with WebGL; without a GPU Chromium offers it only through SwiftShader.
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
)


def ohif_dist() -> Path | None:
    """The unpacked viewer, or None when scripts/install-peers.sh has not installed it."""
    return OHIF_DIST if (OHIF_DIST / "index.html").is_file() else None


def chromium_executable() -> str | None:
    """Debian's Chromium (package `chromium`), or None."""
    return shutil.which("chromium")


def playwright_available() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


# -- the studies ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ViewerStudy:
    uid: str
    patient_id: str
    patient_name: str
    description: str
    modalities: tuple[str, ...]
    """Every modality of the study, over all archives, sorted."""
    series: tuple[str, ...]
    """Series descriptions, in archive order (the viewer's first viewport draws the first)."""


@dataclass(frozen=True, slots=True)
class ViewerData:
    archives: tuple[list[Dataset], list[Dataset]]
    """What each of two archives holds."""
    studies: tuple[ViewerStudy, ...]
    split: ViewerStudy
    """The study whose CT series is on archive 0 and MR series on archive 1."""

    def everything(self) -> list[Dataset]:
        return [*self.archives[0], *self.archives[1]]


SIZE = 64
"""Rows and columns of every image: big enough to show, small enough to load in milliseconds."""


def _pixels(seed: int) -> bytes:
    """A 12-bit ring pattern (16 bits allocated) that differs per instance: variance in every region."""
    out = bytearray()
    centre = (SIZE - 1) / 2
    for row in range(SIZE):
        for col in range(SIZE):
            radius = math.hypot(row - centre, col - centre)
            value = int(2047 + 2000 * math.sin(radius / (2.0 + seed % 3)) * math.cos((row + seed) / 9.0))
            out += struct.pack("<H", max(0, min(4095, value)))
    return bytes(out)


def _image(study: ViewerStudy, accession: str, series_uid: str, series_number: int, modality: str,
           series_description: str, number: int) -> Dataset:
    sop_class = uids.CTImageStorage if modality == "CT" else uids.MRImageStorage
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = make_uid("ohif", series_uid, number)
    ds.StudyDate, ds.StudyTime = "20240315", "101500"
    ds.SeriesDate, ds.SeriesTime = "20240315", f"1016{number:02d}"
    ds.AccessionNumber = accession
    ds.Modality = modality
    ds.ReferringPhysicianName = "House^Gregory"
    ds.PatientName, ds.PatientID = study.patient_name, study.patient_id
    ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study.uid, series_uid
    ds.StudyDescription, ds.SeriesDescription = study.description, series_description
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", series_number, number
    ds.FrameOfReferenceUID = make_uid("ohif-frame", series_uid)
    ds.ImagePositionPatient = [0.0, 0.0, float(5 * number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 5.0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = SIZE
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.WindowCenter, ds.WindowWidth = 2047, 4095
    ds.PixelData = _pixels(number + series_number * 7)
    ds["PixelData"].VR = "OW"
    return ds


def viewer_studies(instances_per_series: int = 3) -> ViewerData:
    """Two studies of two patients on two archives; the first is split (CT on 0, MR on 1)."""
    split = ViewerStudy(make_uid("ohif-study", 1), "OHIF-SPLIT", "Split^Study", "SPLIT CT MR",
                        ("CT", "MR"), ("SPLIT CT AXIAL", "SPLIT MR T1"))
    single = ViewerStudy(make_uid("ohif-study", 2), "OHIF-SINGLE", "Single^Study", "SINGLE CT",
                         ("CT",), ("SINGLE CT AXIAL",))
    first: list[Dataset] = []
    second: list[Dataset] = []
    layout = (
        (split, first, "CT", 1, split.series[0], "ACC-SPLIT"),
        (split, second, "MR", 2, split.series[1], "ACC-SPLIT"),
        (single, first, "CT", 1, single.series[0], "ACC-SINGLE"),
    )
    for study, archive, modality, number, description, accession in layout:
        series_uid = make_uid("ohif-series", study.uid, number)
        archive.extend(_image(study, accession, series_uid, number, modality, description, n)
                       for n in range(1, instances_per_series + 1))
    return ViewerData((first, second), (split, single), split)


# -- the reverse proxy (the Orthanc reference only) ---------------------------------------------------------
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-authorization", "proxy-authenticate", "host", "content-length"}


def proxy_handler(prefix: str, upstream: str) -> type[OhifHandler]:
    """OHIF's handler that also forwards GETs under ``prefix`` to ``upstream`` (a DICOMweb root), streaming.

    Only for a reference server that answers no CORS preflight (Orthanc's plugin): the viewer then reaches
    it on its own origin. The spanner is always reached directly, through CORS.
    """

    class ProxyHandler(OhifHandler):
        def do_GET(self) -> None:
            if urlsplit(self.path).path.startswith(prefix):
                self._forward(upstream + self.path[len(prefix):])
            else:
                super().do_GET()

        def _forward(self, target: str) -> None:
            parts = urlsplit(target)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            # The reference runs open; a key meant for the spanner is none of its business.
            headers.pop("Authorization", None)
            conn = http.client.HTTPConnection(parts.hostname or LOOPBACK, parts.port, timeout=60)
            try:
                conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers)
                answer = conn.getresponse()
                self.send_response(answer.status, answer.reason)
                for key, value in answer.getheaders():
                    if key.lower() not in _HOP_BY_HOP:
                        self.send_header(key, value)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                while chunk := answer.read(65536):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.write(b"0\r\n\r\n")
            finally:
                conn.close()

    return ProxyHandler


# -- the browser ----------------------------------------------------------------------------------------
@dataclass(slots=True)
class Exchange:
    method: str
    url: str
    status: int | None = None
    """None until answered; stays None when the request failed (``failure`` says why)."""
    failure: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    """The request's headers as sent."""


@dataclass(slots=True)
class NetworkLog:
    """What the page asked for: every request under ``base`` (the DICOMweb root, preflights apart); every
    other request that went neither to the viewer's own origin nor under ``base`` (``foreign``: e.g. a
    BulkDataURI pointing past a proxy); and every request that was not for loopback (``blocked``)."""

    base: str
    origin: str
    """The viewer's origin (scheme://host:port): its own files are not logged."""
    exchanges: list[Exchange] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)

    def not_2xx(self) -> list[Exchange]:
        return [e for e in self.exchanges if e.status is None or not 200 <= e.status < 300]

    def pending(self) -> int:
        return sum(1 for e in self.exchanges if e.status is None and e.failure is None)

    def relative(self, exchange: Exchange) -> str:
        """The request's path and query below the DICOMweb root, e.g. ``/studies?limit=101``."""
        return exchange.url[len(self.base):]


def summarize(exchanges: Sequence[Exchange], limit: int = 20) -> str:
    lines = [f"{e.method} {e.url} -> {e.status if e.status is not None else e.failure}" for e in exchanges]
    more = f"\n... and {len(lines) - limit} more" if len(lines) > limit else ""
    return "\n".join(lines[:limit]) + more


# OHIF's first-visit tour would cover the viewport: the browser behaves as one that has seen it.
_INIT_SCRIPT = "window.localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));"


def _loopback(url: str) -> bool:
    host = urlsplit(url).hostname
    return url.startswith(("data:", "blob:", "about:")) or host in (LOOPBACK, "localhost")


class Viewer:
    """One headless Chromium for a test session; ``page()`` opens a fresh context with its own log.

    Chromium sends every request that is not for loopback to a "proxy" on a loopback port that refuses
    connections: such a request fails at once and never leaves the machine, and the page sees it fail.
    """

    def __init__(self, executable: str) -> None:
        from playwright.sync_api import sync_playwright

        self._refuser = ClosedPort()
        self._playwright = sync_playwright().start()
        try:
            # launch() gives the browser a new, empty user-data-dir of its own and removes it on close().
            self.browser = self._playwright.chromium.launch(
                executable_path=executable, headless=True, args=list(CHROMIUM_ARGS),
                proxy={"server": f"http://{LOOPBACK}:{self._refuser.port}", "bypass": "127.0.0.1,localhost"},
                env={**os.environ, "TZ": "UTC"},
            )
        except BaseException:
            self._playwright.stop()
            self._refuser.release()
            raise

    @contextmanager
    def page(
        self, origin: str, dicomweb_base: str, init_script: str = _INIT_SCRIPT
    ) -> Iterator[tuple[Page, NetworkLog]]:
        """A new context (cache, storage) and page for the viewer at ``origin``, closed on leaving; what the
        page requests lands in the log."""
        log = NetworkLog(dicomweb_base.rstrip("/"), origin.rstrip("/"))
        # Service workers would answer some requests themselves and hide them from the log.
        context = self.browser.new_context(viewport={"width": 1280, "height": 800}, service_workers="block")
        context.add_init_script(init_script)
        by_request: dict[int, Exchange] = {}

        def mine(url: str) -> bool:
            return url.startswith(log.base + "/") or url == log.base

        def on_request(request: Request) -> None:
            if not _loopback(request.url):
                log.blocked.append(request.url)
            elif mine(request.url):
                if request.method != "OPTIONS":
                    exchange = Exchange(request.method, request.url, headers=dict(request.headers))
                    by_request[id(request)] = exchange
                    log.exchanges.append(exchange)
            elif not request.url.startswith((log.origin + "/", "data:", "blob:")):
                log.foreign.append(f"{request.method} {request.url}")

        def on_finished(request: Request) -> None:
            exchange = by_request.get(id(request))
            if exchange is not None:
                response = request.response()
                exchange.status = response.status if response is not None else None

        def on_failed(request: Request) -> None:
            exchange = by_request.get(id(request))
            if exchange is not None:
                exchange.failure = request.failure or "failed"

        context.on("request", on_request)
        context.on("requestfinished", on_finished)
        context.on("requestfailed", on_failed)
        try:
            yield context.new_page(), log
        finally:
            context.close()

    def close(self) -> None:
        try:
            self.browser.close()
        finally:
            self._playwright.stop()
            self._refuser.release()


# -- pixels -------------------------------------------------------------------------------------------------
def png_gray_stats(png: bytes) -> tuple[float, float]:
    """Mean and variance of the luminance of an 8-bit RGB or RGBA PNG (what Chromium's screenshots are).

    A small decoder (zlib and the five PNG row filters) rather than an image library for one check.
    """
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, chunks, header = 8, bytearray(), b""
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        body = png[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            chunks += body
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    if depth != 8 or colour not in (2, 6) or interlace:
        raise ValueError(f"unsupported PNG: depth {depth}, colour type {colour}, interlace {interlace}")
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(bytes(chunks))
    stride = width * bpp
    previous = bytearray(stride)
    total = total_sq = 0.0
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        _unfilter(kind, line, previous, bpp)
        for x in range(0, stride, bpp):
            grey = (line[x] * 299 + line[x + 1] * 587 + line[x + 2] * 114) / 1000
            total += grey
            total_sq += grey * grey
        previous = line
    count = width * height
    mean = total / count
    return mean, total_sq / count - mean * mean


def _unfilter(kind: int, line: bytearray, previous: bytearray, bpp: int) -> None:
    if kind == 0:
        return
    for i in range(len(line)):
        left = line[i - bpp] if i >= bpp else 0
        up = previous[i]
        if kind == 1:
            line[i] = (line[i] + left) & 0xFF
        elif kind == 2:
            line[i] = (line[i] + up) & 0xFF
        elif kind == 3:
            line[i] = (line[i] + (left + up) // 2) & 0xFF
        elif kind == 4:
            corner = previous[i - bpp] if i >= bpp else 0
            estimate = left + up - corner
            pa, pb, pc = abs(estimate - left), abs(estimate - up), abs(estimate - corner)
            line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 0xFF
        else:
            raise ValueError(f"PNG row filter {kind}")


# -- reading the page -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StudyRow:
    """One row of OHIF's study list, as shown: "Family, Given", date, modalities, description, count."""

    cells: tuple[str, ...]

    @property
    def patient(self) -> str:
        return self.cells[0]

    @property
    def modalities(self) -> frozenset[str]:
        """The modalities cell split on OHIF's separator (a backslash, as in the DICOM value)."""
        return frozenset(m for m in self.cells[2].replace("/", "\\").split("\\") if m)

    @property
    def instances(self) -> str:
        return self.cells[4] if len(self.cells) > 4 else ""


def shown_name(dicom_name: str) -> str:
    """How OHIF's study list writes a DICOM person name: ``Split^Study`` → ``Split, Study``."""
    return ", ".join(part for part in dicom_name.split("^")[:2] if part)


def study_rows(page: Page, expected: int, timeout_s: float) -> list[StudyRow]:
    """The study list's rows once it shows at least ``expected`` of them (or raise on timeout)."""
    page.wait_for_function(
        "n => [...document.querySelectorAll('tbody tr')]"
        ".filter(r => !r.querySelector('input') && r.querySelectorAll('td').length > 3).length >= n",
        arg=expected, timeout=timeout_s * 1000, polling=100,
    )
    # The first body row holds the column filters (inputs), not a study.
    cells: list[list[str]] = page.evaluate(
        "() => [...document.querySelectorAll('tbody tr')].filter(r => !r.querySelector('input'))"
        ".map(r => [...r.querySelectorAll('td')].map(td => td.innerText.trim())).filter(c => c.length > 3)"
    )
    return [StudyRow(tuple(row)) for row in cells]


# The first viewport's canvas: Cornerstone3D draws each viewport into a 2D canvas of its own (copied from
# its WebGL context), so the canvas's own bitmap is what the viewer shows, without the DOM overlays on top.
_CANVAS = "document.querySelector('.viewport-element canvas.cornerstone-canvas, canvas.cornerstone-canvas')"


def wait_for_drawn_viewport(page: Page, timeout_s: float) -> None:
    """Until the first viewport's canvas has a pixel that is not black (or raise on timeout)."""
    page.wait_for_function(
        f"() => {{ const c = {_CANVAS}; if (!c || !c.width || !c.height) return false;"
        " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " for (let i = 0; i < d.length; i += 4) if (d[i] || d[i + 1] || d[i + 2]) return true;"
        " return false; }",
        timeout=timeout_s * 1000, polling=200,
    )


def viewport_png(page: Page) -> bytes:
    """The first viewport's canvas as a PNG (its bitmap, as the browser encodes it)."""
    import base64

    url: str | None = page.evaluate(
        f"() => {{ const c = {_CANVAS}; return c ? c.toDataURL('image/png') : null; }}"
    )
    if url is None:
        raise AssertionError("the viewer shows no viewport canvas")
    return base64.b64decode(url.split(",", 1)[1])


def settle(page: Page, log: NetworkLog, quiet_s: float = 1.0, timeout_s: float = 30.0) -> None:
    """Until every logged DICOMweb request has its answer and no new one came for ``quiet_s``.

    There is no event for "the viewer asks nothing more", so this watches the log; the page's events
    are delivered while Playwright waits (``wait_for_timeout``), never during a plain sleep.
    """
    waited = quiet = 0.0
    seen = -1
    step = 0.2
    while waited < timeout_s:
        page.wait_for_timeout(step * 1000)
        waited += step
        if log.pending() == 0 and len(log.exchanges) == seen:
            quiet += step
            if quiet >= quiet_s:
                return
        else:
            quiet, seen = 0.0, len(log.exchanges)
    raise AssertionError(f"DICOMweb requests still open after {timeout_s:.0f} s:\n{summarize(log.exchanges)}")
