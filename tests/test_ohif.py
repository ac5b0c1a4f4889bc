"""OHIF 3 in a real browser against a DICOMweb server: the viewer hospitals deploy, unmodified.

OHIF's built viewer (npm package ``@ohif/app``, unpacked into var/ohif/ by scripts/install-peers.sh) is
served on a loopback port with an app config whose ``dicomweb`` data source points at the target's DICOMweb
root; Debian's Chromium runs it headless, driven by Playwright. For each target the test checks what a
person would: the study list shows each study once, a study split across two archives with both
modalities; selecting it lists the series of both archives; opening it draws non-black, non-flat pixels
in the viewport; every DICOMweb request the viewer made was answered 2xx; nothing else was asked of any
other server.

Targets (a module-scoped parameter):
- ``orthanc-dicomweb``: Debian's Orthanc with its DICOMweb plugin holding both studies: the reference that
  proves the harness. Orthanc's plugin answers no CORS preflight, so for this target only the viewer's
  own server forwards ``/dicom-web/`` to Orthanc (same origin).
- ``spanner``: two Orthanc archives registered as nodes of the session's spanner (``api``), the split
  study's CT series on one and its MR series on the other; the viewer (on its own origin, so through CORS)
  points at ``{api}/dicomweb/spans/ohif``, a span of exactly those two archives. It runs when the spanner
  answers ``GET /dicomweb/studies``; until then it skips, except under CI, where it fails.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.conftest import OHIF_PORT, Api, require
from tests.peers.ohif import (
    OHIF_VERSION,
    NetworkLog,
    OhifServer,
    StudyRow,
    ViewerData,
    chromium_executable,
    ohif_dist,
    playwright_available,
    png_gray_stats,
    proxy_handler,
    settle,
    shown_name,
    study_rows,
    summarize,
    viewer_studies,
    viewport_png,
    wait_for_drawn_viewport,
)
from tests.peers.ohif import Viewer as Browser
from tests.peers.orthanc import OrthancPeer, orthanc_executable, stop_all

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = [pytest.mark.orthanc, pytest.mark.ohif]

LOAD_TIMEOUT_S = 90.0
"""First load of the viewer on a cold, busy 2-core machine (measured: 3 s warm, up to 40 s cold)."""
SERIES_TIMEOUT_S = 30.0
SCREENSHOTS = os.environ.get("OHIF_SCREENSHOTS")
"""A folder: each page is also saved there as a PNG when it is read, for a person to look at."""
TOKEN = "ohif-test-token"
SPAN = "ohif"
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    server: OhifServer
    dicomweb: str
    """The DICOMweb root as the browser asks it (no trailing slash)."""
    data: ViewerData


# -- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One Chromium for the whole session."""
    executable = chromium_executable()
    require(executable is not None, "Debian's chromium")
    require(playwright_available(), "the Python package playwright (pip install -e '.[test]')")
    require(ohif_dist() is not None, f"OHIF {OHIF_VERSION} in var/ohif/ (make peers)")
    assert executable is not None
    viewer = Browser(executable)
    yield viewer
    viewer.close()


def dicomweb_plugin() -> str | None:
    """The Orthanc DICOMweb plugin of Debian's orthanc-dicomweb, or None when it is not installed."""
    if Path(PLUGIN).is_file():
        return PLUGIN
    listed = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, check=False)
    return next((line for line in listed.stdout.splitlines() if line.endswith(".so")), None)


def dicomweb_config(plugin: str) -> dict[str, object]:
    return {"Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}


@pytest.fixture(scope="module")
def orthanc_dicomweb_target() -> Iterator[Target]:
    require(orthanc_executable() is not None, "Debian's orthanc")
    plugin = dicomweb_plugin()
    require(plugin is not None, "Debian's orthanc-dicomweb")
    assert plugin is not None
    dist = ohif_dist()
    assert dist is not None
    data = viewer_studies()
    peer = OrthancPeer(aet="OHIFREF", extra_config=dicomweb_config(plugin))
    server: OhifServer | None = None
    try:
        peer.start().upload_datasets(data.everything())
        # Same origin through the viewer's server: Orthanc's plugin answers no CORS preflight.
        server = OhifServer(dist, proxy_handler("/dicom-web", f"{peer.base_url}/dicom-web"))
        base = f"{server.url}/dicom-web"
        server.configure(base, "Orthanc DICOMweb")
        yield Target("orthanc-dicomweb", server, base, data)
    finally:
        if server is not None:
            server.stop()
        peer.stop(graceful=False)


def dicomweb_front_answers(api: Api) -> bool:
    """True when the spanner serves QIDO-RS at /dicomweb/studies (any answer but 404 and 405)."""
    answer = api.http.get("/dicomweb/studies", params={"limit": "1"})
    return answer.status_code not in (404, 405)


@pytest.fixture(scope="module")
def spanner_target(request: pytest.FixtureRequest) -> Iterator[Target]:
    api: Api = request.getfixturevalue("api")
    require(dicomweb_front_answers(api), "the spanner's DICOMweb front (GET /dicomweb/studies answers 404)")
    require(orthanc_executable() is not None, "Debian's orthanc")
    dist = ohif_dist()
    assert dist is not None
    data = viewer_studies()
    store = (str(api.settings.get("store_ae", "SPANNER")), "127.0.0.1", int(str(api.settings["store_port"])))
    peers = [OrthancPeer(aet=f"OHIF_{side}", modalities={"spanner": store}) for side in "AB"]
    names = [f"ohif-{side.lower()}" for side in "AB"]
    server: OhifServer | None = None
    try:
        for peer, name, held in zip(peers, names, data.archives, strict=True):
            peer.start().upload_datasets(held)
            api.add_node(name, peer.dicom_port, ae_title=peer.aet)
        api.add_span(SPAN, names, ae_title="OHIFSPAN")
        server = OhifServer(dist, port=OHIF_PORT)
        base = f"{api.base_url}/dicomweb/spans/{SPAN}"
        server.configure(base, "dicom-spanner")
        check_cors(base, server.url)
        yield Target("spanner", server, base, data)
    finally:
        if server is not None:
            server.stop()
        api.http.delete(f"/api/v1/spans/{SPAN}")
        for name in names:
            api.http.delete(f"/api/v1/nodes/{name}")
        stop_all(peers, graceful=False)


def check_cors(base: str, origin: str) -> None:
    """The viewer is on another origin: the front must answer its preflight, or nothing else can work."""
    answer = httpx.options(f"{base}/studies", headers={
        "Origin": origin, "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "accept,authorization",
    }, timeout=30)
    allowed = answer.headers.get("access-control-allow-origin")
    assert answer.status_code < 300 and allowed in ("*", origin), (
        f"the spanner answers the CORS preflight from {origin} with {answer.status_code}, "
        f"Access-Control-Allow-Origin {allowed!r}: the session's app (tests/conftest.py `api`) must allow "
        f"loopback origins in its CORS setting\n{answer.text[:300]}"
    )


@pytest.fixture(scope="module", params=["orthanc-dicomweb", "spanner"])
def target(request: pytest.FixtureRequest, browser: Browser) -> Target:
    fixture = "orthanc_dicomweb_target" if request.param == "orthanc-dicomweb" else "spanner_target"
    result: Target = request.getfixturevalue(fixture)
    return result


def snapshot(page: Page, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"))


@dataclass(frozen=True, slots=True)
class Visit:
    """What one browser context saw and asked, phase by phase."""

    rows: list[StudyRow]
    series_listed: tuple[str, ...]
    """Series descriptions of the split study that the study list showed once the study was selected."""
    png: bytes
    """The first viewport's canvas once the study was opened."""
    log: NetworkLog


@pytest.fixture(scope="module")
def visit(target: Target, browser: Browser) -> Visit:
    """As a person: open the study list, select the split study, launch the Basic Viewer on it (the page is
    closed before the tests read what it saw, so that no two viewers run at once)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    with browser.page(target.server.url, target.dicomweb) as (page, log):
        page.goto(f"{target.server.url}/", timeout=LOAD_TIMEOUT_S * 1000)
        rows = study_rows(page, len(target.data.studies), LOAD_TIMEOUT_S)
        settle(page, log)
        snapshot(page, f"{target.name}-study-list")
        split = target.data.split
        page.get_by_text(shown_name(split.patient_name), exact=True).click()
        listed = []
        for series in split.series:
            try:
                page.get_by_text(series, exact=True).wait_for(timeout=SERIES_TIMEOUT_S * 1000)
                listed.append(series)
            except PlaywrightTimeout:
                pass  # the test on the series list says which one is missing
        snapshot(page, f"{target.name}-selected")
        page.get_by_role("button", name="Basic Viewer").click()
        wait_for_drawn_viewport(page, LOAD_TIMEOUT_S)
        settle(page, log)
        snapshot(page, f"{target.name}-viewer")
        return Visit(rows, tuple(listed), viewport_png(page), log)


@dataclass(frozen=True, slots=True)
class Link:
    png: bytes
    log: NetworkLog


@pytest.fixture(scope="module")
def link(target: Target, browser: Browser) -> Link:
    """The split study opened from a link, with a key as OHIF takes one: ``&token=`` in the viewer's URL."""
    with browser.page(target.server.url, target.dicomweb) as (page, log):
        page.goto(f"{target.server.url}/viewer?StudyInstanceUIDs={target.data.split.uid}&token={TOKEN}",
                  timeout=LOAD_TIMEOUT_S * 1000)
        wait_for_drawn_viewport(page, LOAD_TIMEOUT_S)
        settle(page, log)
        snapshot(page, f"{target.name}-link")
        return Link(viewport_png(page), log)


# -- tests ---------------------------------------------------------------------------------------------------
def test_study_list_shows_each_study_once_and_the_split_one_with_both_modalities(
    target: Target, visit: Visit
) -> None:
    shown = [row.patient for row in visit.rows]
    assert sorted(shown) == sorted(shown_name(s.patient_name) for s in target.data.studies), visit.rows
    for study in target.data.studies:
        (row,) = [r for r in visit.rows if r.patient == shown_name(study.patient_name)]
        assert row.modalities == frozenset(study.modalities), row


def test_study_list_counts_the_instances_of_every_archive(target: Target, visit: Visit) -> None:
    for study in target.data.studies:
        (row,) = [r for r in visit.rows if r.patient == shown_name(study.patient_name)]
        held = sum(1 for ds in target.data.everything() if ds.StudyInstanceUID == study.uid)
        assert row.instances == str(held), row


def test_selecting_the_split_study_lists_the_series_of_both_archives(target: Target, visit: Visit) -> None:
    assert visit.series_listed == target.data.split.series


@pytest.mark.parametrize("opened", ["from the study list", "from a link with a token"])
def test_opening_the_split_study_draws_its_pixels(visit: Visit, link: Link, opened: str) -> None:
    png = visit.png if opened == "from the study list" else link.png
    mean, variance = png_gray_stats(png)
    # The ring pattern shown at full window spans black to white: far from flat, far from black.
    assert mean > 20 and variance > 500, f"viewport looks blank: mean {mean:.1f}, variance {variance:.1f}"


def test_frames_of_both_archives_series_are_fetched(target: Target, visit: Visit) -> None:
    """The viewport draws the CT series (archive A); the MR series (archive B) gives its thumbnail."""
    series = {ds.SeriesInstanceUID for ds in target.data.archives[0] + target.data.archives[1]
              if ds.StudyInstanceUID == target.data.split.uid}
    framed = [e.url for e in visit.log.exchanges if "/frames/" in e.url]
    fetched = {uid for url in framed for uid in series if f"/series/{uid}/" in url}
    assert fetched == series, summarize(visit.log.exchanges, 60)


@pytest.mark.parametrize("opened", ["from the study list", "from a link with a token"])
def test_every_dicomweb_request_is_answered_2xx(visit: Visit, link: Link, opened: str) -> None:
    log = visit.log if opened == "from the study list" else link.log
    assert log.exchanges, "the viewer asked the DICOMweb server nothing"
    assert not log.not_2xx(), summarize(log.not_2xx())
    kinds = {kind for e in log.exchanges for kind in ("/studies?", "/series?", "/metadata", "/frames/")
             if kind in log.relative(e)}
    assert kinds == {"/studies?", "/series?", "/metadata", "/frames/"}, summarize(log.exchanges, 60)


def test_a_token_in_the_link_reaches_every_request_as_a_bearer_key(link: Link) -> None:
    without = [e for e in link.log.exchanges if e.headers.get("authorization") != f"Bearer {TOKEN}"]
    assert not without, summarize(without)


def test_nothing_else_is_asked_of_any_server(visit: Visit, link: Link) -> None:
    for log in (visit.log, link.log):
        assert not log.blocked, f"the viewer reached off loopback: {log.blocked[:10]}"
        assert not log.foreign, f"requests outside the DICOMweb root: {log.foreign[:10]}"



def _png(rows: list[bytes], width: int, filters: list[int]) -> bytes:
    """An 8-bit RGB PNG whose rows are stored with the given filter types (the encoder's side)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    raw, previous = bytearray(), bytes(width * 3)
    for row, kind in zip(rows, filters, strict=True):
        out = bytearray()
        for i, value in enumerate(row):
            left = row[i - 3] if i >= 3 else 0
            up, corner = previous[i], previous[i - 3] if i >= 3 else 0
            estimate = left + up - corner
            pa, pb, pc = abs(estimate - left), abs(estimate - up), abs(estimate - corner)
            paeth = left if pa <= pb and pa <= pc else up if pb <= pc else corner
            predictor = (0, left, up, (left + up) // 2, paeth)[kind]
            out.append((value - predictor) & 0xFF)
        raw += bytes([kind]) + out
        previous = row
    header = struct.pack(">IIBBBBB", width, len(rows), 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(raw))) + \
        chunk(b"IEND", b"")


def test_png_statistics_undo_every_row_filter() -> None:
    """The viewport check decodes Chromium's PNGs itself: each of the five row filters must come back."""
    width = 4
    rows = [bytes((x * 60 + y * 20) % 256 for x in range(width) for _ in range(3)) for y in range(5)]
    greys = [row[i] for row in rows for i in range(0, len(row), 3)]
    mean = sum(greys) / len(greys)
    variance = sum(g * g for g in greys) / len(greys) - mean * mean
    got = png_gray_stats(_png(rows, width, [0, 1, 2, 3, 4]))
    assert got == pytest.approx((mean, variance), abs=0.01)
    black = png_gray_stats(_png([bytes(width * 3)] * 3, width, [4, 0, 1]))
    assert black == (0.0, 0.0)
