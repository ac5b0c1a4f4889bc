"""`spanner run`: the demo fleet rule, and a real start that Ctrl-C stops without leaving a process behind."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pydicom
import pytest

from cluster.launcher import prepare_demo_fleet
from simulator.fleet import stop_fleet
from spanner.schemas import NodeIn
from spanner.settings import load_settings
from spanner.storage import Repository, create_schema, make_engine
from tests.conftest import require
from tests.peers.ports import descendants, free_port, free_port_block, listening_off_loopback, off_loopback


def test_demo_fleet_starts_only_without_real_nodes(tmp_path: Path) -> None:
    base = free_port_block(4)  # three simulators and the demo viewer's port
    settings = load_settings(var_dir=str(tmp_path), demo_base_port=base)
    said: list[str] = []
    fleet = prepare_demo_fleet(settings, said.append)
    try:
        assert [p.port for p in fleet] == [base, base + 1, base + 2]
        repo = Repository(make_engine(settings.effective_database_url))
        assert [n.name for n in repo.list_nodes()] == ["demo-a", "demo-b", "demo-c"]
        assert [(d.name, d.ae_title, d.port) for d in repo.list_destinations()] == \
            [("demo-viewer", "MYSTORESCP", base + 3)]
    finally:
        stop_fleet(fleet)
    repo.create_node(NodeIn(name="real", ae_title="REAL", host="127.0.0.1", port=104))
    assert prepare_demo_fleet(settings, said.append) == []
    assert [n.name for n in repo.list_nodes()] == ["real"]
    assert repo.list_destinations() == []
    assert any("removed demo node" in line for line in said)


def test_demo_fleet_can_be_turned_off(tmp_path: Path) -> None:
    settings = load_settings(var_dir=str(tmp_path), demo_fleet=False)
    assert prepare_demo_fleet(settings, print) == []
    repo = Repository(make_engine(settings.effective_database_url))
    create_schema(repo.engine)
    assert repo.list_nodes() == []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
    return state != "Z"


def c_find_through_front(port: int) -> int:
    """The final status of a STUDY C-FIND through the run's DICOM front."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE

    from scp import translate

    ae = AE(ae_title="LAUNCHTEST")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(translate.STUDY_ROOT_FIND)
    assoc = ae.associate("127.0.0.1", port, ae_title="SPANNER")
    assert assoc.is_established
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    try:
        statuses = [int(st.Status) for st, _ in assoc.send_c_find(ds, translate.STUDY_ROOT_FIND)]
    finally:
        assoc.release()
    return statuses[-1]


def movescu_as_printed(banner: list[str], received: Path) -> None:
    """The banner's storescp and movescu lines, run as printed (storescp writing into ``received``): the
    demo study, split or mirrored across the simulators, arrives whole through the spanner."""
    from cluster.launcher import DEMO_RECEIVED
    from simulator.dataset import generate_fleet
    from simulator.fleet import DEMO_NODES, demo_study_uid
    from tests.peers.ports import wait_for_port

    require(shutil.which("movescu") is not None and shutil.which("storescp") is not None, "dcmtk")
    (receive,) = [line.split("&&", 1)[1].strip().rstrip("&").strip() for line in banner
                  if line.strip().startswith(f"mkdir -p {DEMO_RECEIVED} && storescp")]
    (move,) = [line.strip() for line in banner if line.strip().startswith("movescu -S -aec SPANNER")]
    received.mkdir()
    storescp = [str(received) if arg == DEMO_RECEIVED else arg for arg in shlex.split(receive)]
    env = {"PATH": os.environ["PATH"], "TCP_NODELAY": "1"}
    receiver = subprocess.Popen(storescp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(int(storescp[-1]))
        run = subprocess.run(shlex.split(move), env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
    finally:
        receiver.terminate()
        receiver.wait(10)
    study = demo_study_uid()
    expected = {str(ds.SOPInstanceUID) for instances in generate_fleet(42, len(DEMO_NODES))
                for ds in instances if ds.StudyInstanceUID == study}
    got = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in received.iterdir()}
    assert expected and got == expected, run.stderr


@pytest.mark.timeout(240)
def test_spanner_run_serves_the_demo_fleet_and_sigterm_leaves_nothing(tmp_path: Path) -> None:
    http, dashboard, base, dicom = free_port(), free_port(), free_port_block(4), free_port()
    ray_tmp = tempfile.mkdtemp(prefix="sr-")  # Ray's socket paths must stay under 108 bytes
    env = os.environ | {
        "SPANNER_VAR_DIR": str(tmp_path / "var"),
        "SPANNER_HTTP_PORT": str(http),
        "SPANNER_DASHBOARD_PORT": str(dashboard),
        "SPANNER_DEMO_BASE_PORT": str(base),
        "SPANNER_SCP_PORT": str(dicom),
        "SPANNER_STORE_PORT": str(free_port()),
        "SPANNER_AUTH_CACHE_TTL_S": "1",
        "SPANNER_NAMESPACE": "launcher-test",
        "RAY_TMPDIR": ray_tmp,
        "RAY_AUTH_MODE": "disabled",
    }
    env.pop("RAY_ADDRESS", None)
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "run"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{http}"
        deadline = time.monotonic() + 150
        answer = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                response = httpx.post(
                    f"{url}/api/v1/queries", json={"level": "STUDY", "limit": 3}, timeout=10
                )
                if response.status_code == 200:
                    answer = response.json()
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert answer is not None, (tmp_path / "run.log").read_text()[-3000:]
        assert answer["status"] == "success"
        assert sorted(o["node"] for o in answer["nodes"]) == ["demo-a", "demo-b", "demo-c"]
        ready_by = time.monotonic() + 20  # the banner is printed right after serve.run returns
        while "Ready." not in (tmp_path / "run.log").read_text() and time.monotonic() < ready_by:
            time.sleep(0.2)
        banner = (tmp_path / "run.log").read_text()
        assert "Ready." in banner
        # not wrapped at 80 columns in a log: the curl line and the auth note stay whole
        lines = banner.splitlines()
        assert any(line.startswith("  curl -s -X POST") and line.endswith("\\") for line in lines), banner
        assert any("Authentication OFF until the first key" in line and "no restart needed" in line
                   for line in lines), banner
        assert c_find_through_front(dicom) == 0x0000
        movescu_as_printed(lines, tmp_path / "received")
        create = [sys.executable, "-m", "cli.main", "keys", "create", "ward", "--role", "query"]
        made = subprocess.run(create, env=env, capture_output=True, text=True, timeout=60)
        assert made.returncode == 0 and "Authentication is now ON" in made.stdout, made.stdout + made.stderr
        key = made.stdout.strip().splitlines()[-1]
        refused_by = time.monotonic() + 10  # the replica's cache TTL is 1 s here
        status = 200
        while status == 200 and time.monotonic() < refused_by:
            status = httpx.get(f"{url}/api/v1/spans", timeout=10).status_code
            time.sleep(0.2)
        assert status == 401, "the first key must turn authentication on without a restart"
        keyed = httpx.post(f"{url}/api/v1/queries", json={"level": "STUDY", "limit": 3}, timeout=30,
                           headers={"Authorization": f"Bearer {key}"})
        assert keyed.status_code == 200
        assert c_find_through_front(dicom) == 0x0000, "the run's DICOM front has a dicom_front key of its own"
        started = descendants(proc.pid)
        assert started, "spanner run should have started Ray's processes"
        assert off_loopback(started | {proc.pid}) == [], "traffic must stay on loopback"
        assert listening_off_loopback(started | {proc.pid}) == [], "every listening socket on loopback"
        agents = {pid for pid in started if Path(f"/proc/{pid}/comm").read_text().startswith("ray::")}
        assert agents, "Ray's agents and workers are among the run's processes"
        last = httpx.post(f"{url}/api/v1/queries", json={"level": "STUDY", "limit": 3}, timeout=30,
                          headers={"Authorization": f"Bearer {key}"})
        assert last.status_code == 200
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # the record of the query just answered may still be queued
        assert proc.wait(timeout=60) == 0
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.2)
        gone_s = time.monotonic() - signalled
        assert not [pid for pid in started if alive(pid)], "SIGTERM left processes behind"
        assert gone_s < 15, f"SIGTERM took {gone_s:.1f} s to stop everything"
        assert "stopped in" in (tmp_path / "run.log").read_text()
        settings = load_settings(var_dir=str(tmp_path / "var"))  # the database the run used
        engine = make_engine(settings.effective_database_url)
        try:  # the query answered just before SIGTERM has its record
            query_id = last.json()["query_id"]
            assert Repository(engine).get_query(query_id).id == query_id
        finally:
            engine.dispose()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
