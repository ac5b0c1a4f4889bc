"""HTTP routes, one module per resource; each gets the replica's Services through ``services``.

Serve runs a copy of the FastAPI app object, so the replica registers its Services here (a module of
the replica's process) rather than on ``app.state`` of the module's app.
"""

from __future__ import annotations

from serve_app.services import Services

_current: list[Services] = []


def register(s: Services) -> None:
    _current[:] = [s]


def services() -> Services:
    if not _current:
        raise RuntimeError("the ingress has not registered its services yet")
    return _current[0]
