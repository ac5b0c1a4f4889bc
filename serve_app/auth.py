"""API keys and roles as FastAPI dependencies, attached per router or route.

A key is ``spk_`` + 43 URL-safe characters (32 random bytes); only its SHA-256 is stored; lookups are
cached per replica (serve_app.keys). Roles (spanner.schemas.ApiRole): ``query`` runs queries and
retrievals and reads nodes, spans and records; ``admin`` may also change nodes and spans and read
the audit trail; ``dicom_front`` may do what ``query`` may and is the only role whose requests may
name a DICOM caller (``X-Spanner-Calling-AE`` / ``X-Spanner-Peer``): the audit records the key that
asked and, apart from it, the caller the front asserted.

When authentication is on (``auth_enabled``, the default) keys are required, with one exception: in
development, while no key of role ``admin`` or ``query`` exists, the API stays open (``anonymous``). The
first such key closes it on every replica within ``auth_cache_ttl_s`` seconds, without a restart. A
``dicom_front`` key alone does not close it: ``spanner run`` makes one for its own DICOM front. Production
always requires keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Depends, Request

from serve_app.deps import services
from serve_app.errors import Forbidden, Unauthenticated
from serve_app.services import Services
from serve_app.timing import arrived
from spanner import hops
from spanner.keys import hash_key
from spanner.schemas import ApiRole, Channel
from spanner.storage import Audit

CALLING_AE_HEADER = "X-Spanner-Calling-AE"
PEER_HEADER = "X-Spanner-Peer"
ANONYMOUS = "anonymous"
MISSING_KEY = ("an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>' "
               "(an admin creates keys with `spanner keys create NAME --role query`)")
UNKNOWN_KEY = "the API key is unknown or revoked; ask an admin for a valid one"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a key's name and role, or ``anonymous`` (with every right) when auth is off."""

    name: str
    role: ApiRole
    authenticated: bool


OPEN = Principal(ANONYMOUS, ApiRole.ADMIN, authenticated=False)


def presented_key(request: Request) -> str | None:
    """The key of ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    key = request.headers.get("x-api-key", "").strip()
    return key or None


async def is_open(s: Services) -> bool:
    """True when requests without a key are served: auth turned off, or development with no admin or
    query key yet."""
    if not s.settings.auth_enabled:
        return True
    return s.settings.environment == "development" and not await s.keys.closing_keys_exist()


async def principal_of(s: Services, key: str | None, arrived: float | None = None) -> Principal:
    """The principal of a presented key (HTTP header or AMQP message header); raises Unauthenticated.
    ``arrived``: when the request came (monotonic clock; default now), the oldest key read it may trust.

    A valid key is its principal even while the API is open, so the audit names it."""
    if key is not None:
        key_hash = hash_key(key)
        found = await s.keys.find(key_hash, arrived)
        if found is not None:
            return Principal(found.name, ApiRole(found.role), authenticated=True)
    if await is_open(s):
        return OPEN
    raise Unauthenticated(MISSING_KEY if key is None else UNKNOWN_KEY)


async def authenticate(request: Request, s: Services = Depends(services)) -> Principal:
    """401 without a valid key (unless auth is off); the principal is kept on ``request.state``."""
    principal = await principal_of(s, presented_key(request), arrived(request))
    request.state.principal = principal
    return principal


async def require_query(principal: Principal = Depends(authenticate)) -> Principal:
    """Any role: queries, retrievals, reading nodes, spans and records."""
    return principal


async def require_admin(principal: Principal = Depends(authenticate)) -> Principal:
    """Role admin: changing nodes and spans, the audit trail."""
    if principal.role is not ApiRole.ADMIN:
        raise Forbidden(f"API key {principal.name!r} has role {principal.role.value!r}; this needs an "
                        "admin key")
    return principal


def audit_of(
    request: Request, principal: Principal, patient_id: str | None, channel: Channel = Channel.HTTP
) -> Audit:
    """Who asked: always the key (principal), over ``channel``; for the DICOM front's requests also the
    caller it asserts (and then the channel is ``dimse``).

    Only a ``dicom_front`` key (or anyone while authentication is off) may assert a caller: from any
    other key the headers are refused with 403, so a key holder cannot write another name into the
    audit trail.
    """
    client = request.client.host if request.client else None
    calling_ae = request.headers.get(CALLING_AE_HEADER, "").strip()
    peer = request.headers.get(PEER_HEADER, "").strip()
    if not calling_ae and not peer:
        return Audit(principal=principal.name, channel=channel, client=client, patient_id=patient_id)
    if principal.authenticated and principal.role is not ApiRole.DICOM_FRONT:
        raise Forbidden(f"API key {principal.name!r} has role {principal.role.value!r}: only a key of role "
                        f"{ApiRole.DICOM_FRONT.value!r} may send {CALLING_AE_HEADER} or {PEER_HEADER}")
    return Audit(principal=principal.name, channel=Channel.DIMSE, client=client, patient_id=patient_id,
                 asserted_ae=calling_ae[:16] or None, asserted_peer=peer[:255] or None)


def hops_of(request: Request, principal: Principal) -> tuple[str, ...]:
    """The dicom-spanner deployments a query already passed (``X-Spanner-Hops``, set by the DICOM front).

    Like the caller it asserts, only a ``dicom_front`` key (or anyone while authentication is off) may
    send it: from another key the header is refused with 403.
    """
    value = request.headers.get(hops.HOPS_HEADER, "").strip()
    if not value:
        return ()
    if principal.authenticated and principal.role is not ApiRole.DICOM_FRONT:
        raise Forbidden(f"API key {principal.name!r} has role {principal.role.value!r}: only a key of role "
                        f"{ApiRole.DICOM_FRONT.value!r} may send {hops.HOPS_HEADER}")
    return hops.parse_header(value)
