"""The one storage SCP of a deployment: a named, detached Ray actor that owns SPANNER_STORE_PORT and runs
proxy retrievals (spanner.proxy_move) over it.

Every archive is configured with one move destination for the spanner (SPANNER_STORE_AE at this host
and port), so exactly one process may listen there however many ingress replicas run: the replicas
find this actor by name (``get_if_exists``: the first one to ask creates it, the others get the same
one) and stream each retrieval's events back from it. The spool lives with it. The port is opened at
the first retrieval, so a deployment that never proxies never listens there; settings changed later
reach it only when the actor is restarted (``ray kill`` of the name, or a restart of the cluster).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from actors.dimse import GET_MODELS, MOVE_MODELS, encoder
from actors.wado_stream import Item, WadoRequest, WadoSessions
from spanner.nodespec import RetrieveMethod
from spanner.proxy_move import HolderPart, InstanceEvent, PartEvent, Peer, proxy_move
from spanner.query import InformationModel, Level, MoveQuery
from spanner.settings import Settings
from spanner.spool import Spool
from spanner.store_scp import StorageScp

ACTOR_NAME = "spanner-store"


@dataclass(frozen=True, slots=True)
class StoreConfig:
    ae_title: str
    host: str
    port: int
    spool_dir: str
    spool_max_bytes: int
    spool_ttl_s: float

    @classmethod
    def of(cls, settings: Settings) -> StoreConfig:
        return cls(settings.store_ae, settings.scp_host, settings.store_port,
                   str(settings.effective_spool_dir), settings.spool_max_bytes, settings.spool_ttl_s)


@dataclass(frozen=True, slots=True)
class ProxyPart:
    """One part of a retrieval as the serve side plans it: its holder first, the other holders after."""

    node: str
    archive: Peer
    calling_ae: str
    level: Level
    keys: tuple[tuple[str, str], ...]
    model: InformationModel
    dimse_timeout_s: float
    method: RetrieveMethod = RetrieveMethod.C_MOVE

    @property
    def cache_key(self) -> str:
        """The part as the spool's manifests name it: what it asks for, not who holds it."""
        return "|".join([self.level.value, *(f"{k}={v}" for k, v in self.keys)])


@ray.remote(num_cpus=0)
class StoreService:
    def __init__(self, config: StoreConfig) -> None:
        self._config = config
        self._scp = StorageScp(Spool(Path(config.spool_dir), config.spool_max_bytes, config.spool_ttl_s),
                               ae_title=config.ae_title)
        self._port: int | None = None
        self._starting = asyncio.Lock()
        self._wado = WadoSessions(self._scp)

    async def config(self) -> StoreConfig:
        return self._config

    async def port(self) -> int:
        """The port it listens on, opening it first when no retrieval has yet."""
        async with self._starting:
            if self._port is None:
                self._port = await self._scp.start(self._config.host, self._config.port)
            return self._port

    @ray.method(num_returns="streaming")
    async def move(self, part: ProxyPart, destination: Peer, deadline_s: float
                   ) -> AsyncIterator[InstanceEvent | PartEvent]:
        """The part's instances as they are forwarded to ``destination``, then its PartEvent.

        The archive sends them to this actor's storage SCP (C-MOVE) or back on the actor's own association
        (C-GET), as the node's ``retrieve_method`` says."""
        await self.port()
        identifier = MoveQuery(part.level, part.keys, self._config.ae_title).identifier()
        models = GET_MODELS if part.method is RetrieveMethod.C_GET else MOVE_MODELS
        holder = HolderPart(part.node, part.archive, encoder(identifier), model=models[part.model],
                            method=part.method, cache_key=part.cache_key)
        async for event in proxy_move(self._scp, [holder], destination, calling_ae=part.calling_ae,
                                      dimse_timeout_s=part.dimse_timeout_s, deadline_s=deadline_s):
            yield event


    async def forget_node(self, node: str) -> int:
        """A node changed or went: nothing spooled from it is served again; how many instances went."""
        return self._scp.spool.drop_node(node)

    # -- WADO-RS: the HTTP sink (actors.wado_stream) ------------------------------------------------------
    async def wado_open(self, request: WadoRequest) -> tuple[str, list[Item]] | None:
        """A session streaming what ``request`` names, with its first items (one round trip less); None
        when the request has no parts and the spool lacks some of what it names."""
        if request.parts:
            await self.port()
        session = self._wado.open(request, self._config.ae_title)
        if session is None:
            return None
        return session, await self._wado.pull(session)

    async def wado_pull(self, session_id: str) -> list[Item]:
        """The session's next items (at least one; waits for it); a session ends with a Done or a Refusal."""
        return await self._wado.pull(session_id)

    async def wado_close(self, session_id: str) -> None:
        """End a session early: its archives' C-MOVEs are cancelled (C-CANCEL)."""
        await self._wado.close(session_id)

    async def wado_stats(self) -> dict[str, int]:
        """Open sessions, live C-MOVE expectations, spooled instances and C-STOREs refused (matching no
        retrieval) since start: for tests and operators."""
        return self._wado.stats()


StoreHandle = Any  # a Ray actor handle of StoreService


def existing(settings: Settings) -> StoreHandle | None:
    """The deployment's store actor if one runs (a deployment that never proxied has none)."""
    try:
        return ray.get_actor(ACTOR_NAME, namespace=settings.namespace)
    except ValueError:
        return None


def forget_node(settings: Settings, node: str, timeout_s: float = 10.0) -> None:
    """Blocking: the store actor, if one runs, serves nothing spooled from ``node`` any more."""
    handle = existing(settings)
    if handle is not None:
        ray.get(handle.forget_node.remote(node), timeout=timeout_s)


def get(settings: Settings) -> StoreHandle:
    """The deployment's store actor, created by whichever replica asks first."""
    return StoreService.options(  # type: ignore[attr-defined]
        name=ACTOR_NAME, namespace=settings.namespace, lifetime="detached", get_if_exists=True
    ).remote(StoreConfig.of(settings))
