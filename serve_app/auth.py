"""API keys and roles as FastAPI dependencies, attached per router or route.

A key is ``spk_`` + 43 URL-safe characters (32 random bytes); only its SHA-256 is stored; lookups are
cached per replica (serve_app.keys). Roles: ``query`` runs queries and retrievals and reads nodes,
spans and records; ``admin`` may also change nodes and spans and read the audit trail.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from dataclasses import dataclass

from fastapi import Depends, HTTPException, Request

from serve_app.deps import services
from serve_app.services import Services
from spanner.storage import Audit

KEY_PREFIX = "spk_"
PUBLIC_CHARS = 12  # "spk_" and 8 characters: enough to tell keys apart, useless for guessing
CALLING_AE_HEADER = "X-Spanner-Calling-AE"
PEER_HEADER = "X-Spanner-Peer"
ANONYMOUS = "anonymous"
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def new_key() -> tuple[str, str, str]:
    """A fresh key, its public prefix and its hash (only the last two are stored)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, key[:PUBLIC_CHARS], hash_key(key)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a key's name and role, or ``anonymous`` (with every right) when auth is off."""

    name: str
    role: str
    authenticated: bool


def presented_key(request: Request) -> str | None:
    """The key of ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    key = request.headers.get("x-api-key", "").strip()
    return key or None


async def authenticate(request: Request, s: Services = Depends(services)) -> Principal:
    """401 without a valid key (unless auth is off); the principal is kept on ``request.state``."""
    if not s.settings.auth_enabled:
        principal = Principal(ANONYMOUS, "admin", authenticated=False)
    else:
        key = presented_key(request)
        if key is None:
            raise HTTPException(401, "an API key is required: send 'Authorization: Bearer <key>' or "
                                     "'X-API-Key: <key>' (an admin creates keys with `spanner keys create`)",
                                headers=_CHALLENGE)
        key_hash = hash_key(key)
        hit, found = s.keys.cached(key_hash)
        if not hit:
            found = await asyncio.to_thread(s.keys.lookup, key_hash)
        if found is None:
            raise HTTPException(401, "the API key is unknown or revoked; ask an admin for a valid one",
                                headers=_CHALLENGE)
        principal = Principal(found.name, found.role, authenticated=True)
    request.state.principal = principal
    return principal


async def require_query(principal: Principal = Depends(authenticate)) -> Principal:
    """Role query or admin: queries, retrievals, reading nodes, spans and records."""
    return principal


async def require_admin(principal: Principal = Depends(authenticate)) -> Principal:
    """Role admin: changing nodes and spans, the audit trail."""
    if principal.role != "admin":
        raise HTTPException(403, f"API key {principal.name!r} has role {principal.role!r}; this needs an "
                                 "admin key")
    return principal


def audit_of(request: Request, principal: Principal, patient_id: str | None) -> Audit:
    """Who asked: the DICOM front's caller (trusted only from a key holder, or with auth off) or the
    HTTP caller itself."""
    client = request.client.host if request.client else None
    calling_ae = request.headers.get(CALLING_AE_HEADER, "").strip()
    if calling_ae and principal.role in ("query", "admin"):
        peer = request.headers.get(PEER_HEADER, "").strip() or client
        return Audit(principal=f"ae:{calling_ae[:16]}", channel="dimse", client=peer, patient_id=patient_id)
    return Audit(principal=principal.name, channel="http", client=client, patient_id=patient_id)
