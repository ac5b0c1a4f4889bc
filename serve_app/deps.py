"""What routes receive as FastAPI dependencies: the replica's Services, from the app that serves them.

The ingress builds one FastAPI app per replica (serve_app.ingress.create_app) and keeps the replica's
Services on its ``state``; a route asks for them with ``s: ServicesDep``. Nothing is held in a module,
so a test may build an app around any Services it likes.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from serve_app.services import Services


async def services(request: Request) -> Services:  # async: FastAPI would run a plain def in a thread
    found = getattr(request.app.state, "services", None)
    if not isinstance(found, Services):
        raise RuntimeError("this app was not built by serve_app.ingress.create_app: it holds no Services")
    return found


ServicesDep = Annotated[Services, Depends(services)]
