"""PDUs of the DICOM Upper Layer (PS3.8 9.3) and their items, as dataclasses with encode/decode.

Decoding checks lengths and raises ProtocolError on anything malformed, so a garbage PDU ends only the
association it arrived on.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field
from enum import IntEnum

from spanner.dicom_constants import APPLICATION_CONTEXT, IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION
from spanner.dimse.errors import ProtocolError


class PduType(IntEnum):
    ASSOCIATE_RQ = 0x01
    ASSOCIATE_AC = 0x02
    ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    RELEASE_RQ = 0x05
    RELEASE_RP = 0x06
    ABORT = 0x07


class ContextResult(IntEnum):
    """Presentation context result/reason (PS3.8 9.3.3.2)."""

    ACCEPTANCE = 0
    USER_REJECTION = 1
    NO_REASON = 2
    ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
    TRANSFER_SYNTAXES_NOT_SUPPORTED = 4


class RejectResult(IntEnum):
    PERMANENT = 1
    TRANSIENT = 2


class RejectSource(IntEnum):
    SERVICE_USER = 1
    SERVICE_PROVIDER_ACSE = 2
    SERVICE_PROVIDER_PRESENTATION = 3


class RejectReason(IntEnum):
    """Reasons of source 1, service user (PS3.8 9.3.4)."""

    NO_REASON = 1
    APPLICATION_CONTEXT_NOT_SUPPORTED = 2
    CALLING_AE_NOT_RECOGNIZED = 3
    CALLED_AE_NOT_RECOGNIZED = 7


HEADER = struct.Struct(">BBI")
ITEM = struct.Struct(">BBH")
DEFAULT_MAX_PDU = 1 << 20  # what this engine announces it can receive


_PDU_TYPES = frozenset(int(t) for t in PduType)


def pdu(kind: int, body: bytes) -> bytes:
    return HEADER.pack(kind, 0, len(body)) + body


def item(kind: int, body: bytes) -> bytes:
    return ITEM.pack(kind, 0, len(body)) + body


def _ae(title: str) -> bytes:
    raw = title.encode("ascii")
    if not 1 <= len(raw.strip()) <= 16:
        raise ValueError(f"AE title {title!r} must be 1-16 characters")
    return raw.ljust(16)


def _uid(raw: bytes) -> str:
    return raw.rstrip(b"\0 ").decode("ascii", "replace")


def items(body: bytes, offset: int) -> list[tuple[int, bytes]]:
    """The variable items from ``offset`` on: (type, value), lengths checked."""
    out: list[tuple[int, bytes]] = []
    while offset < len(body):
        if offset + 4 > len(body):
            raise ProtocolError("truncated item header")
        kind, _, length = ITEM.unpack_from(body, offset)
        end = offset + 4 + length
        if end > len(body):
            raise ProtocolError(f"item 0x{kind:02X} claims {length} bytes past the end of its PDU")
        out.append((kind, body[offset + 4:end]))
        offset = end
    return out


@dataclass(frozen=True, slots=True)
class ProposedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AcceptedContext:
    """A presentation context's result; ``transfer_syntax`` is meaningful only when accepted."""

    context_id: int
    result: ContextResult
    transfer_syntax: str
    abstract_syntax: str = ""  # not on the wire in an A-ASSOCIATE-AC; filled in from the request

    @property
    def accepted(self) -> bool:
        return self.result is ContextResult.ACCEPTANCE


@dataclass(frozen=True, slots=True)
class RoleSelection:
    """SCP/SCU Role Selection sub-item (PS3.7 D.3.3.4) for one SOP class.

    A C-GET requester proposes ``scp_role=True`` for each storage class it wants instances of, so that the
    peer may C-STORE back on the same association; the acceptor answers which roles it grants.
    """

    sop_class_uid: str
    scu_role: bool
    scp_role: bool

    def encode(self) -> bytes:
        uid = self.sop_class_uid.encode()
        return item(0x54, struct.pack(">H", len(uid)) + uid + bytes((int(self.scu_role), int(self.scp_role))))

    @classmethod
    def decode(cls, value: bytes) -> RoleSelection:
        if len(value) < 2:
            raise ProtocolError("role selection sub-item too short")
        (length,) = struct.unpack(">H", value[:2])
        if len(value) != 2 + length + 2:
            raise ProtocolError(f"role selection sub-item of {len(value)} bytes does not hold a "
                                f"{length}-byte UID and two role bytes")
        return cls(_uid(value[2:2 + length]), bool(value[-2]), bool(value[-1]))


@dataclass(frozen=True, slots=True)
class UserInformation:
    max_pdu: int = DEFAULT_MAX_PDU  # 0: no limit
    implementation_class_uid: str = IMPLEMENTATION_CLASS_UID
    implementation_version: str = IMPLEMENTATION_VERSION
    roles: tuple[RoleSelection, ...] = ()

    def encode(self) -> bytes:
        out = item(0x51, struct.pack(">I", self.max_pdu)) + item(0x52, self.implementation_class_uid.encode())
        out += b"".join(role.encode() for role in self.roles)  # PS3.7 D.3.3.4: after the class UID
        if self.implementation_version:
            out += item(0x55, self.implementation_version.encode()[:16])
        return item(0x50, out)

    @classmethod
    def decode(cls, value: bytes) -> UserInformation:
        max_pdu, uid, version = 0, "", ""
        roles: list[RoleSelection] = []
        for kind, sub in items(value, 0):
            if kind == 0x51:
                if len(sub) != 4:
                    raise ProtocolError("maximum length sub-item is not 4 bytes")
                (max_pdu,) = struct.unpack(">I", sub)
            elif kind == 0x52:
                uid = _uid(sub)
            elif kind == 0x54:
                roles.append(RoleSelection.decode(sub))
            elif kind == 0x55:
                version = sub.decode("ascii", "replace").strip()
        return cls(max_pdu, uid, version, tuple(roles))

    def role_for(self, sop_class_uid: str) -> RoleSelection | None:
        """The role selection proposed or granted for one SOP class, if any."""
        return next((role for role in self.roles if role.sop_class_uid == sop_class_uid), None)


def _header(called: str, calling: str) -> bytes:
    return struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + bytes(32)


def _split_header(body: bytes, what: str) -> tuple[str, str]:
    if len(body) < 68:
        raise ProtocolError(f"{what} of {len(body)} bytes is shorter than its 68-byte fixed part")
    return (body[4:20].decode("ascii", "replace").strip(), body[20:36].decode("ascii", "replace").strip())


_RawContext = tuple[int, int, list[tuple[int, str]]]  # context ID, result byte, (sub-item type, UID)


def _association_items(body: bytes, what: str, context_kind: int
                       ) -> tuple[str, str, str, list[_RawContext], UserInformation]:
    """What A-ASSOCIATE-RQ and -AC share: AE titles, application context, contexts, user information."""
    called, calling = _split_header(body, what)
    app, contexts, user = "", [], UserInformation(0, "", "")
    for kind, value in items(body, 68):
        if kind == 0x10:
            app = _uid(value)
        elif kind == context_kind:
            if len(value) < 4:
                raise ProtocolError(f"presentation context item of {what} too short")
            contexts.append((value[0], value[2], [(k, _uid(v)) for k, v in items(value, 4)]))
        elif kind == 0x50:
            user = UserInformation.decode(value)
    return called, calling, app, contexts, user


@dataclass(frozen=True, slots=True)
class AssociateRequest:
    called_ae: str
    calling_ae: str
    contexts: tuple[ProposedContext, ...]
    user: UserInformation = field(default_factory=UserInformation)
    application_context: str = APPLICATION_CONTEXT

    def encode(self) -> bytes:
        body = _header(self.called_ae, self.calling_ae) + item(0x10, self.application_context.encode())
        for ctx in self.contexts:
            sub = item(0x30, ctx.abstract_syntax.encode())
            for ts in ctx.transfer_syntaxes:
                sub += item(0x40, ts.encode())
            body += item(0x20, bytes([ctx.context_id, 0, 0, 0]) + sub)
        return pdu(PduType.ASSOCIATE_RQ, body + self.user.encode())

    @classmethod
    def decode(cls, body: bytes) -> AssociateRequest:
        called, calling, app, raw_contexts, user = _association_items(body, "A-ASSOCIATE-RQ", 0x20)
        contexts = tuple(
            ProposedContext(context_id, next((uid for kind, uid in subs if kind == 0x30), ""),
                            tuple(uid for kind, uid in subs if kind == 0x40))
            for context_id, _, subs in raw_contexts)
        return cls(called, calling, contexts, user, app)


@dataclass(frozen=True, slots=True)
class AssociateAccept:
    called_ae: str
    calling_ae: str
    contexts: tuple[AcceptedContext, ...]
    user: UserInformation = field(default_factory=UserInformation)
    application_context: str = APPLICATION_CONTEXT

    def encode(self) -> bytes:
        body = _header(self.called_ae, self.calling_ae) + item(0x10, self.application_context.encode())
        for ctx in self.contexts:
            value = bytes([ctx.context_id, 0, ctx.result, 0]) + item(0x40, ctx.transfer_syntax.encode())
            body += item(0x21, value)
        return pdu(PduType.ASSOCIATE_AC, body + self.user.encode())

    @classmethod
    def decode(cls, body: bytes) -> AssociateAccept:
        called, calling, app, raw_contexts, user = _association_items(body, "A-ASSOCIATE-AC", 0x21)
        contexts = []
        for context_id, result, subs in raw_contexts:
            try:
                outcome = ContextResult(result)
            except ValueError:
                raise ProtocolError(f"presentation context result {result} is not defined") from None
            transfer = next((uid for kind, uid in subs if kind == 0x40), "")
            contexts.append(AcceptedContext(context_id, outcome, transfer))
        return cls(called, calling, tuple(contexts), user, app)


@dataclass(frozen=True, slots=True)
class AssociateReject:
    result: int = RejectResult.PERMANENT
    source: int = RejectSource.SERVICE_USER
    reason: int = RejectReason.NO_REASON

    def encode(self) -> bytes:
        return pdu(PduType.ASSOCIATE_RJ, bytes([0, self.result, self.source, self.reason]))

    @classmethod
    def decode(cls, body: bytes) -> AssociateReject:
        if len(body) != 4:
            raise ProtocolError("A-ASSOCIATE-RJ is not 4 bytes long")
        return cls(body[1], body[2], body[3])


RELEASE_RQ = pdu(PduType.RELEASE_RQ, bytes(4))
RELEASE_RP = pdu(PduType.RELEASE_RP, bytes(4))


def abort(source: int = 0, reason: int = 0) -> bytes:
    """A-ABORT: source 0 service user, 2 service provider (reason then from PS3.8 9.3.8)."""
    return pdu(PduType.ABORT, bytes([0, 0, source, reason]))


async def read_pdu(reader: asyncio.StreamReader, max_length: int) -> tuple[int, bytes]:
    """One PDU (type, body). ``max_length`` bounds what a peer may make us buffer (0: none but sanity)."""
    header = await reader.readexactly(6)
    kind, _, length = HEADER.unpack(header)
    if kind not in _PDU_TYPES:
        raise ProtocolError(f"unknown PDU type 0x{kind:02X}")
    limit = (max_length or DEFAULT_MAX_PDU * 16) + (6 if kind == PduType.P_DATA_TF else 64 * 1024)
    if length > limit:
        raise ProtocolError(f"PDU type 0x{kind:02X} of {length} bytes exceeds the {limit} accepted")
    return kind, await reader.readexactly(length)
