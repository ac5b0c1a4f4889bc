"""A real Orthanc (Debian's `orthanc`) as a test peer: own config file, loopback ports, ended by PID.

Orthanc 1.10.1 has no bind-address option: HTTP and DICOM listen on every interface (0.0.0.0).
`RemoteAccessAllowed: false` makes the HTTP server refuse every non-loopback client; the DICOM port has no
such guard, so the peer holds no data that matters and lives only as long as its test.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from pydicom.dataset import Dataset

from simulator.dataset import write_part10
from tests.peers.ports import LOOPBACK, free_port, wait_for_port

ORTHANC_EXECUTABLE = "Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
"""Debian's orthanc-dicomweb (`dpkg -L orthanc-dicomweb`): Orthanc's DICOMweb plugin, the reference server."""
DICOMWEB_ROOT = "/dicom-web"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

Modality = tuple[str, str, int]
"""A DicomModalities entry: (AE title, host, port)."""


_LIVE: weakref.WeakSet[OrthancPeer] = weakref.WeakSet()
"""Started peers; stopped at interpreter exit if a script or test run forgot (or crashed before) stop()."""


@atexit.register
def _stop_leftovers() -> None:
    stop_all(list(_LIVE), graceful=False)


class OrthancPeerError(RuntimeError):
    """Orthanc did not start, or its REST API refused a request; the message carries the log tail."""


def dicomweb_plugin() -> str | None:
    """Path of Orthanc's DICOMweb plugin, or None when Debian's orthanc-dicomweb is not installed."""
    return DICOMWEB_PLUGIN if os.path.exists(DICOMWEB_PLUGIN) else None


def orthanc_executable() -> str | None:
    """Path of the Orthanc binary, or None when the Debian package is not installed."""
    return shutil.which(ORTHANC_EXECUTABLE) or (
        "/usr/sbin/Orthanc" if os.access("/usr/sbin/Orthanc", os.X_OK) else None
    )


class OrthancPeer:
    """One Orthanc process with its own temp dir, config file and free loopback ports.

    Every DICOM permission is open (`DicomAlwaysAllow*`) so any calling AE title may query it; C-MOVE
    destinations must still be declared in `modalities` (or later with `add_modality`).
    `default_encoding` is Orthanc's "DefaultEncoding": None keeps its default "Latin1", whose C-FIND answers
    carry ISO_IR 100 and lose characters outside Latin-1; "Utf8" answers ISO_IR 192.
    """

    def __init__(
        self,
        aet: str = "ORTHANC",
        modalities: Mapping[str, Modality] | None = None,
        extra_config: Mapping[str, Any] | None = None,
        start_deadline_s: float = 10.0,
        tcp_nodelay: bool = True,
        default_encoding: str | None = None,
        dicomweb: bool = False,
    ) -> None:
        if not 0 < len(aet) <= 16:
            raise ValueError(f"AE title {aet!r} must be 1 to 16 characters")
        self._aet = aet
        self._modalities: dict[str, Modality] = dict(modalities or {})
        self._extra_config = dict(extra_config or {})
        self._start_deadline_s = start_deadline_s
        self._tcp_nodelay = tcp_nodelay
        self._default_encoding = default_encoding
        self._dicomweb = dicomweb
        self._dicom_port = 0
        self._http_port = 0
        self._workdir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._client: httpx.Client | None = None
        self._signalled: signal.Signals | None = None
        self.start_seconds: float | None = None
        """Seconds from spawn until GET /system answered and the DICOM port accepted (last start)."""

    # -- properties -------------------------------------------------------------------------------------
    @property
    def aet(self) -> str:
        return self._aet

    @property
    def dicom_port(self) -> int:
        return self._dicom_port

    @property
    def http_port(self) -> int:
        return self._http_port

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self._http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (a peer started with ``dicomweb=True``)."""
        return f"{self.base_url}{DICOMWEB_ROOT}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise OrthancPeerError("Orthanc peer is not started")
        return self._workdir

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    @property
    def config_path(self) -> Path:
        return self.workdir / "orthanc.json"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- configuration ----------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The JSON configuration written for the next start (useful to see what the peer runs with)."""
        workdir = self.workdir
        config: dict[str, Any] = {
            "Name": f"spanner-test-{self._aet}",
            "DicomAet": self._aet,
            "DicomPort": self._dicom_port,
            "HttpPort": self._http_port,
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowStore": True,
            "SynchronousCMove": True,
            # "Always": answers and filters may read the stored files: any requested attribute can come back.
            "StorageAccessOnFind": "Always",
            "DicomModalities": {name: list(entry) for name, entry in self._modalities.items()},
            # Less to start and nothing a test needs.
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "SaveJobs": False,
            "HttpCompressionEnabled": False,
            "Plugins": [],
            "LuaScripts": [],
        }
        if self._default_encoding is not None:
            config["DefaultEncoding"] = self._default_encoding
        if self._dicomweb:
            config["Plugins"] = [DICOMWEB_PLUGIN]
            config["DicomWeb"] = {"Enable": True, "Root": DICOMWEB_ROOT + "/"}
        config.update(self._extra_config)
        return config

    # -- life cycle -------------------------------------------------------------------------------------
    def start(self, attempts: int = 3) -> OrthancPeer:
        """Start Orthanc and wait until GET /system answers and the DICOM port accepts, or raise.

        Free ports are picked just before spawning; if another process takes one in between, Orthanc exits
        and the start is retried on fresh ports.
        """
        if self.running:
            return self
        executable = orthanc_executable()
        if executable is None:
            raise OrthancPeerError("Orthanc executable not found (Debian package `orthanc`)")
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix=f"orthanc-{self._aet.lower()}-"))
        last_error: OrthancPeerError | None = None
        for _ in range(attempts):
            try:
                self._spawn(executable)
                return self
            except OrthancPeerError as exc:
                last_error = exc
                self._terminate()
        self.stop()
        assert last_error is not None
        raise last_error

    def _spawn(self, executable: str) -> None:
        self._dicom_port = free_port()
        self._http_port = free_port()
        while self._http_port == self._dicom_port:
            self._http_port = free_port()
        self.config_path.write_text(json.dumps(self.config(), indent=2), encoding="utf-8")
        env = dict(os.environ)
        if self._tcp_nodelay:
            env["TCP_NODELAY"] = "1"  # read by DCMTK inside Orthanc: no Nagle stalls on its DICOM sockets
        else:
            env.pop("TCP_NODELAY", None)
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [executable, str(self.config_path)],  # a FILE: a folder would merge every *.json in it
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
                start_new_session=True,  # a Ctrl-C in the test runner does not reach it; we end it by PID
            )
        _LIVE.add(self)
        self._wait_ready(started)
        self.start_seconds = time.monotonic() - started

    def _wait_ready(self, started: float) -> None:
        deadline = started + self._start_deadline_s
        assert self._process is not None
        with httpx.Client(base_url=self.base_url, timeout=1.0, trust_env=False) as client:
            while True:
                if self._process.poll() is not None:
                    status = self._process.returncode
                    raise OrthancPeerError(f"Orthanc exited with status {status} on start\n{self.log_tail()}")
                try:
                    if client.get("/system").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() >= deadline:
                    raise OrthancPeerError(
                        f"Orthanc REST API did not answer within {self._start_deadline_s:.1f} s\n"
                        f"{self.log_tail()}"
                    )
                time.sleep(0.01)
        try:
            wait_for_port(self._dicom_port, deadline_s=max(0.1, deadline - time.monotonic()))
        except TimeoutError as exc:
            raise OrthancPeerError(f"{exc}\n{self.log_tail()}") from exc

    def _signal_stop(self, graceful: bool) -> None:
        """Send SIGTERM (graceful) or SIGKILL to our own process, by PID; does not wait."""
        if self._client is not None:
            self._client.close()  # an open keep-alive connection would hold up Orthanc's HTTP shutdown
            self._client = None
        sig = signal.SIGTERM if graceful else signal.SIGKILL
        if self._process is not None and self._process.poll() is None and self._signalled != sig:
            self._process.send_signal(sig)
            self._signalled = sig

    def _terminate(self, timeout_s: float = 5.0, graceful: bool = True) -> None:
        """End our own process by PID: SIGTERM, then SIGKILL if it has not exited after timeout_s."""
        self._signal_stop(graceful)
        process, self._process, self._signalled = self._process, None, None
        if process is None:
            return
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)

    def stop(self, timeout_s: float = 5.0, graceful: bool = True) -> None:
        """Terminate the process and remove the temp dir.

        Orthanc 1.10.1 needs about 3.4 s to stop on SIGTERM (HTTP server ~1.9 s, DICOM server ~1 s); SIGKILL
        follows after timeout_s. graceful=False kills at once: the peer's data is thrown away anyway.
        """
        self._terminate(timeout_s, graceful)
        _LIVE.discard(self)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> OrthancPeer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        """Last lines of Orthanc's log, for error messages."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except (OSError, OrthancPeerError):
            return "(no Orthanc log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- REST -------------------------------------------------------------------------------------------
    @property
    def client(self) -> httpx.Client:
        """One keep-alive HTTP client per peer, closed by stop()."""
        if not self.running:
            raise OrthancPeerError("Orthanc peer is not running")
        if self._client is None:
            self._client = httpx.Client(base_url=self.base_url, timeout=30.0, trust_env=False)
        return self._client

    def _check(self, response: httpx.Response) -> Any:
        if response.is_error:
            raise OrthancPeerError(
                f"Orthanc {response.request.method} {response.request.url.path} answered "
                f"{response.status_code}: {response.text[:500]}"
            )
        return response.json() if response.content else None

    def get(self, path: str) -> Any:
        """GET a REST path and return its JSON."""
        return self._check(self.client.get(path))

    def upload(self, part10: bytes) -> dict[str, Any]:
        """Store one Part-10 file via POST /instances; returns Orthanc's answer (ID, ParentStudy, ...)."""
        answer: dict[str, Any] = self._check(
            self.client.post("/instances", content=part10, headers={"Content-Type": "application/dicom"})
        )
        return answer

    def upload_many(self, files: Iterable[bytes]) -> int:
        """Store many Part-10 files over one keep-alive connection; returns how many were stored."""
        count = 0
        for part10 in files:
            self.upload(part10)
            count += 1
        return count

    def upload_datasets(self, datasets: Iterable[Dataset]) -> int:
        """Store pydicom datasets (e.g. from simulator.dataset.generate_fleet) as Part-10 files."""
        return self.upload_many(write_part10(ds) for ds in datasets)

    def patients(self) -> list[str]:
        return list(self.get("/patients"))

    def studies(self) -> list[str]:
        return list(self.get("/studies"))

    def series(self) -> list[str]:
        return list(self.get("/series"))

    def instances(self) -> list[str]:
        return list(self.get("/instances"))

    def statistics(self) -> dict[str, Any]:
        """GET /statistics: CountPatients/CountStudies/CountSeries/CountInstances without listing IDs."""
        stats: dict[str, Any] = self.get("/statistics")
        return stats

    def add_modality(self, name: str, aet: str, port: int, host: str = LOOPBACK) -> None:
        """Declare a C-MOVE destination at run time (PUT /modalities/{name}); no restart needed."""
        self._check(self.client.put(f"/modalities/{name}", json={"AET": aet, "Host": host, "Port": port}))
        self._modalities[name] = (aet, host, port)

    def clear(self) -> None:
        """Delete every patient (and so every study, series and instance)."""
        for patient in self.patients():
            self._check(self.client.delete(f"/patients/{patient}"))


def stop_all(peers: Iterable[OrthancPeer], timeout_s: float = 5.0, graceful: bool = True) -> None:
    """Stop several peers in parallel: signal all first, then wait, so their shutdown delays overlap."""
    peers = list(peers)
    for peer in peers:
        peer._signal_stop(graceful)
    for peer in peers:
        peer.stop(timeout_s, graceful)


def make_instance(
    patient_id: str,
    patient_name: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    modality: str = "CT",
    study_date: str = "20240101",
    **extra: Any,
) -> bytes:
    """A small CT Image Storage Part-10 file without pixel data (Orthanc stores it all the same).

    Extra keyword arguments are DICOM keywords set on the dataset, e.g. SpecificCharacterSet="ISO_IR 192".
    """
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = study_date
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.ReferringPhysicianName = ""
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return write_part10(ds)
