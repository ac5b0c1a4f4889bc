"""Changing a destination: the database write, then one log line naming who changed what.

A destination decides where the spanner itself sends patient data, so every change is logged with the
API key that made it (``destination.created`` / ``.replaced`` / ``.patched`` / ``.deleted``, field
``principal``), next to the access that the key's role already restricts to admins.
"""

from __future__ import annotations

import asyncio
import logging

from serve_app.auth import Principal
from serve_app.services import Services
from spanner.schemas import DestinationIn, DestinationOut, DestinationPatch, DestinationPut

LOG = logging.getLogger(__name__)


def _logged(change: str, name: str, principal: Principal) -> None:
    LOG.info("destination %s %s by %s", name, change, principal.name,
             extra={"event": f"destination.{change}", "destination": name, "principal": principal.name})


async def create(s: Services, body: DestinationIn, principal: Principal) -> DestinationOut:
    made = await asyncio.to_thread(s.repo.create_destination, body)
    _logged("created", body.name, principal)
    return made


async def replace(s: Services, name: str, body: DestinationPut, principal: Principal) -> DestinationOut:
    stored = await asyncio.to_thread(s.repo.replace_destination, name, body)
    _logged("replaced", name, principal)
    return stored


async def patch(s: Services, name: str, body: DestinationPatch, principal: Principal) -> DestinationOut:
    stored = await asyncio.to_thread(s.repo.patch_destination, name, body)
    _logged("patched", name, principal)
    return stored


async def delete(s: Services, name: str, principal: Principal) -> None:
    await asyncio.to_thread(s.repo.delete_destination, name)
    _logged("deleted", name, principal)
