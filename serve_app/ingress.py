"""The HTTP ingress: a FastAPI app served by one Ray Serve deployment.

Each replica builds its Services (database, coordinator) from the settings passed by the app
builder, so a replica on another host needs no environment of its own, and then its own FastAPI app
around them (``create_app``): routes receive the Services as a dependency (serve_app.deps).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI
from ray import serve

from serve_app import amqp_requests, errors
from serve_app.amqp_requests import AmqpRequest, RequestConsumer
from serve_app.routes import audit, destinations, health, nodes, queries, retrievals, spans
from serve_app.services import Services
from serve_app.timing import ServerTiming
from spanner.logs import configure_logging
from spanner.settings import Settings

DESCRIPTION = (
    "One front door to every PACS: a spanning C-FIND fans out to every archive of a span at once "
    "and answers with one merged, de-duplicated list and each archive's outcome. Every /api route needs "
    "an API key (`Authorization: Bearer <key>` or `X-API-Key`) unless authentication is turned off."
)


def create_app(services: Services) -> FastAPI:
    """The HTTP API around one replica's Services."""
    app = FastAPI(title="dicom-spanner", version="0.1.0", description=DESCRIPTION)
    app.state.services = services
    errors.install(app)
    for module in (queries, retrievals, nodes, spans, destinations, audit, health):
        app.include_router(module.router)
    app.add_middleware(ServerTiming)
    return app


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress()
class Ingress:
    def __init__(self, settings: dict[str, Any]) -> None:
        parsed = Settings(**settings)
        configure_logging("ingress", parsed)
        self.services = Services(parsed)
        self.services.reconcile()
        self.consumer: RequestConsumer | None = None
        if parsed.rabbitmq_url and parsed.requests_queue:
            # Serve runs the constructor on the replica's event loop: requests run there, like HTTP ones.
            self.consumer = RequestConsumer(parsed, asyncio.get_running_loop(), self._amqp_query)
            self.consumer.start()

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve calls this once, after the constructor: the replica's app, around its Services."""
        return create_app(self.services)

    async def _amqp_query(self, request: AmqpRequest) -> tuple[dict[str, Any], int]:
        return await amqp_requests.answer(self.services, request)

    async def __del__(self) -> None:
        """Serve awaits this at shutdown: no more AMQP requests, then the queued records are written."""
        if getattr(self, "consumer", None) is not None:
            self.consumer.stop()  # type: ignore[union-attr]
        if getattr(self, "services", None) is not None:
            await self.services.records.close()
