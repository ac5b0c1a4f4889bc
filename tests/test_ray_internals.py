"""Ray's private API is used in one module, which refuses a Ray it was not checked against."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import ray

from cluster import ray_internals
from cluster.ray_internals import RayInternalsChanged, check

ROOT = Path(__file__).resolve().parent.parent
PRIVATE_MARKERS = (
    "ray._private", "ray._common", "serve._private", "_node_ip_address", "_temp_dir", "ENABLE_RAY_CLUSTER",
)
PACKAGES = ("spanner", "actors", "serve_app", "scp", "cluster", "cli", "simulator", "benchmarks", "tests")


def test_the_installed_ray_is_the_pinned_one() -> None:
    check()
    assert ray.__version__.startswith(ray_internals.PINNED_RAY + ".")
    assert f"ray[serve]>={ray_internals.PINNED_RAY}," in (ROOT / "pyproject.toml").read_text()


@pytest.mark.parametrize("version", ["2.61.0", "3.0.0", "2.6.0", "2.600.1"])
def test_another_ray_version_fails_loudly(version: str) -> None:
    with pytest.raises(RayInternalsChanged, match=r"cluster/ray_internals\.py") as caught:
        check(version)
    assert version in str(caught.value)
    assert str(pickle.loads(pickle.dumps(caught.value))) == str(caught.value)


def test_no_other_module_touches_rays_private_api() -> None:
    sources = [p for d in PACKAGES for p in (ROOT / d).rglob("*.py")]
    allowed = {ROOT / "cluster" / "ray_internals.py", Path(__file__).resolve()}
    offenders = [
        f"{p.relative_to(ROOT)}: {marker}"
        for p in sources
        if p.resolve() not in allowed
        for marker in PRIVATE_MARKERS
        # "_node_ip_address" as a name of its own: ray.util.get_node_ip_address is public
        if re.search(r"(?<!\w)" + re.escape(marker), p.read_text())
    ]
    assert not offenders, "Ray's private API outside cluster/ray_internals.py:\n" + "\n".join(offenders)


def test_local_init_options_keep_the_driver_on_loopback() -> None:
    assert ray_internals.local_init_options() == {"_node_ip_address": "127.0.0.1"}
    assert ray_internals.local_init_options("/tmp/x")["_temp_dir"] == "/tmp/x"


@ray.remote(num_cpus=0)
class _Probe:
    def ping(self) -> str:
        return "pong"


def test_process_accounting_sees_actors_and_rays_own_processes(ray_session: str) -> None:
    probe = _Probe.remote()  # type: ignore[attr-defined]
    try:
        assert ray.get(probe.ping.remote()) == "pong"
        alive = [info for info in ray_internals.actor_table().values() if info.get("State") == "ALIVE"]
        names = [str(info.get("ActorClassName", "")) for info in alive if info.get("Pid")]
        assert any(name.endswith("_Probe") for name in names)
        pids = ray_internals.ray_system_pids()
        assert pids and all(Path(f"/proc/{pid}").exists() for pid in pids)
    finally:
        ray.kill(probe)
