"""The replica's graceful stop writes the query records still queued: what SIGTERM to ``spanner run`` sets off
(cluster.launcher deletes the Serve app; Serve awaits the replica's ``__del__``, which closes the writer).

The records are kept queued by a write lock the test holds on the app's SQLite database (WAL: the queries
still read their spans); the lock is let go only once the stop has begun."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest
from ray import serve

from simulator.dataset import generate_fleet
from simulator.scp import SimulatedPacs, SimulatorConfig
from tests.conftest import Api
from tests.test_admission import _app

STOP_BEGUN_S = 5.0


def test_stopping_the_replica_writes_the_records_still_queued(
    api: Api, ray_session: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    archive = SimulatedPacs(SimulatorConfig(ae_title="DRAINPACS"), generate_fleet(11, 1, 3)[0])
    with archive, _app(api, ray_session, tmp_path_factory, "drain", {}, delete=False) as app:
        app.add_node("drain", archive.port, ae_title="DRAINPACS")
        database = Path(str(app.settings["database_url"]).removeprefix("sqlite:///"))
        lock = sqlite3.connect(database, timeout=30, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # no writer but this one: the records wait in the replica's queue
        released = False
        stopping: threading.Thread | None = None
        try:
            ids = []
            for n in range(3):
                response = app.http.post("/api/v1/queries", json={"level": "PATIENT", "timeout_s": 5},
                                         headers={"Cache-Control": "no-cache"})
                assert response.status_code == 200, response.text
                ids.append(response.json()["query_id"])
                if n == 0:
                    # The first record's write starts and waits for the lock in a worker thread (one
                    # the process finishes at exit anyway); the next two stay in the writer's queue,
                    # which only the stop's flush empties.
                    time.sleep(0.5)
            assert _recorded(database, ids) == 0  # still queued in the replica
            stopping = threading.Thread(target=serve.delete, args=("spanner-drain",))
            stopping.start()  # from here the thread deletes the app, whatever happens
            # Serve first waits (about 2 s) for requests in flight, then awaits the replica's __del__: the
            # lock goes only once that has begun, so the records are written by the stop's flush or never.
            time.sleep(STOP_BEGUN_S)
            lock.execute("ROLLBACK")
            released = True
            stopping.join(60)
            assert not stopping.is_alive(), "the app did not stop within 60 s"
        finally:
            if not released:
                lock.execute("ROLLBACK")
            lock.close()
            if stopping is None:  # failed before the stop: delete the app here
                serve.delete("spanner-drain")
    assert _recorded(database, ids) == 3, "the graceful stop must write every queued record"


def _recorded(database: Path, ids: list[str]) -> int:
    with sqlite3.connect(database, timeout=30) as conn:
        marks = ",".join("?" * len(ids))
        row = conn.execute(f"SELECT count(*) FROM query_records WHERE id IN ({marks})", ids).fetchone()
    return int(row[0])
