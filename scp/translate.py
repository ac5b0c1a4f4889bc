"""DICOM <-> the spanner's JSON: identifiers become API bodies, answers become identifiers and statuses.

Pure functions, no I/O: every decision about which DIMSE status answers which outcome lives here,
so the handlers only move values between the association and the HTTP client.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from scp.encode import NotEncodable, json_element, text_element
from scp.errors import (
    ApiFailed,
    ApiRejected,
    ApiUnreachable,
    InvalidIdentifier,
    LoopDetected,
    ScpError,
    UnsupportedRequest,
)
from scp.spans import SpanInfo
from spanner.dicom_constants import (
    FAILED_SOP_INSTANCE_UID_LIST,
    PATIENT_ROOT_FIND,
    PATIENT_ROOT_GET,
    PATIENT_ROOT_MOVE,
    QUERY_RETRIEVE_LEVEL,
    RETRIEVE_AE_TITLE,
    SPECIFIC_CHARACTER_SET,
    STUDY_ROOT_FIND,
    STUDY_ROOT_GET,
    STUDY_ROOT_MOVE,
    VERIFICATION,
    Status,
)
from spanner.dimse.acceptor import MoveResult
from spanner.query import MODEL_LEVELS, InformationModel, Level

__all__ = ["PATIENT_ROOT_FIND", "PATIENT_ROOT_GET", "PATIENT_ROOT_MOVE", "STUDY_ROOT_FIND", "STUDY_ROOT_GET",
           "STUDY_ROOT_MOVE", "VERIFICATION"]
# (the SOP classes the front serves, re-exported for its callers; the module's own names stay public)

SUPPORTED = (VERIFICATION, PATIENT_ROOT_FIND, STUDY_ROOT_FIND, PATIENT_ROOT_MOVE, STUDY_ROOT_MOVE,
             PATIENT_ROOT_GET, STUDY_ROOT_GET)
MODELS: dict[str, InformationModel] = {
    PATIENT_ROOT_FIND: InformationModel.PATIENT_ROOT,
    STUDY_ROOT_FIND: InformationModel.STUDY_ROOT,
    PATIENT_ROOT_MOVE: InformationModel.PATIENT_ROOT,
    STUDY_ROOT_MOVE: InformationModel.STUDY_ROOT,
    PATIENT_ROOT_GET: InformationModel.PATIENT_ROOT,
    STUDY_ROOT_GET: InformationModel.STUDY_ROOT,
}

# Statuses (PS3.4 C.4.1.1.4 and C.4.2.1.5; the 0xC0xx are this implementation's "unable to process").
SUCCESS = Status.SUCCESS
PENDING = Status.PENDING
CANCEL = Status.CANCEL
MOVE_SUBOPS_WARNING = Status.SUBOPERATIONS_FAILED  # Warning: sub-operations complete, some failed
MOVE_DESTINATION_UNKNOWN = Status.MOVE_DESTINATION_UNKNOWN
IDENTIFIER_INVALID = Status.IDENTIFIER_DOES_NOT_MATCH
API_UNREACHABLE = 0xC001
SPAN_FAILED = 0xC002
API_ERROR = 0xC003
NOT_SUPPORTED = 0xC004
LOOP_DETECTED = Status.LOOP_DETECTED  # the query already passed this dicom-spanner (spanner.hops)

ANSWER_CHARSET = "ISO_IR 192"  # the API gives Unicode; every answer goes out in UTF-8
_SET_BY_FRONT = frozenset({QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET, RETRIEVE_AE_TITLE})
_US_MAX = 0xFFFF


# -- statuses ------------------------------------------------------------------------------------------
def comment(text: str) -> str:
    """An ErrorComment: LO, so at most 64 characters of the default repertoire and no backslash."""
    ascii_text = text.encode("ascii", "replace").decode("ascii").replace("\\", "/")
    return " ".join(ascii_text.split())[:64]


def status_code_for(exc: ScpError) -> int:
    """The failure status of an error of the front (HTTP -> DIMSE, translated once here)."""
    if isinstance(exc, InvalidIdentifier):
        return IDENTIFIER_INVALID
    if isinstance(exc, ApiRejected):
        # 400/422 name a key or value of the request; any other 4xx (a span deleted since the
        # association, a missing route) is nothing the client's identifier can fix.
        return IDENTIFIER_INVALID if exc.http_status in (400, 422) else API_ERROR
    if isinstance(exc, ApiUnreachable):
        return API_UNREACHABLE
    if isinstance(exc, ApiFailed):
        return SPAN_FAILED if exc.http_status == 502 else API_ERROR
    if isinstance(exc, UnsupportedRequest):
        return NOT_SUPPORTED
    if isinstance(exc, LoopDetected):
        return LOOP_DETECTED
    return API_ERROR


def failure(exc: ScpError) -> tuple[int, str]:
    """The failure status of an error and its ErrorComment."""
    return status_code_for(exc), comment(str(exc))


# -- identifiers -----------------------------------------------------------------------------------------
def level_of(identifier: Dataset, model: InformationModel) -> Level:
    """The QueryRetrieveLevel, checked against what the information model allows (PS3.4 C.6)."""
    if QUERY_RETRIEVE_LEVEL not in identifier:
        raise InvalidIdentifier("QueryRetrieveLevel (0008,0052) is missing")
    raw = str(identifier[QUERY_RETRIEVE_LEVEL].value or "").strip().upper()
    try:
        level = Level(raw)
    except ValueError:
        raise InvalidIdentifier(f"QueryRetrieveLevel {raw!r}: not PATIENT, STUDY, SERIES or IMAGE") from None
    if level not in MODEL_LEVELS[model]:
        raise InvalidIdentifier(f"{level.value} level is not in the {model.value.replace('_', ' ')} model")
    return level


def _text(value: object) -> str:
    if isinstance(value, bytes | bytearray):
        raise ValueError("binary value")
    if isinstance(value, PersonName):
        return str(value)
    return str(value)


def _wire(elem: DataElement) -> str | list[str] | None:
    """An element's matching value for the API; None asks for the key (universal matching)."""
    value = elem.value
    if value is None or value == "" or value == b"":
        return None
    if isinstance(value, MultiValue | list | tuple):
        items = [_text(v) for v in value]
        if not items:
            return None
        if len(items) == 1:
            return items[0]
        return items if elem.VR == "UI" else "\\".join(items)
    return _text(value)


def _has_values(elem: DataElement) -> bool:
    """True when a sequence holds a matching value (sequence matching, which the API lacks)."""
    for item in elem.value or ():
        for inner in item:
            if inner.VR == "SQ" and _has_values(inner):
                return True
            if inner.VR != "SQ" and inner.value not in (None, "", b""):
                return True
    return False


@dataclass(frozen=True, slots=True)
class FindRequest:
    """One C-FIND as the API body, with the keys (tag, VR) each answer must carry back."""

    level: Level
    body: dict[str, Any]
    requested: tuple[tuple[int, str], ...]


def find_request(identifier: Dataset, model: InformationModel, span: SpanInfo) -> FindRequest:
    """Elements with a value are filters, elements without are return keys; private tags are ignored."""
    level = level_of(identifier, model)
    filters: dict[str, str | list[str]] = {}
    return_keys: list[str] = []
    requested: list[tuple[int, str]] = []
    try:
        for elem in identifier:
            tag = int(elem.tag)
            if elem.tag.is_private or elem.tag.element == 0 or elem.tag.group < 8 or tag in _SET_BY_FRONT:
                continue
            keyword = elem.keyword
            if not keyword:
                continue  # not in the dictionary: nothing the API could name
            if elem.VR == "SQ":
                if _has_values(elem):
                    raise InvalidIdentifier(f"{keyword}: sequence matching is not supported")
                continue  # an empty sequence asks for a return key the API does not give
            requested.append((tag, str(elem.VR)))
            value = _wire(elem)
            if value is None:
                return_keys.append(keyword)
            else:
                filters[keyword] = value
    except InvalidIdentifier:
        raise
    except Exception as exc:  # a value pydicom cannot decode under its VR
        raise InvalidIdentifier(f"cannot read the identifier: {exc}") from exc
    body = {
        "level": level.value,
        "span": span.name,
        "filters": filters,
        "return_keys": return_keys,
        "limit": span.max_results,
    }
    return FindRequest(level, body, tuple(requested))


class AnswerEncoder:
    """Encodes merged matches as C-FIND response identifiers: the requested keys only, in UTF-8.

    What every answer of a request shares (the character set, level and Retrieve AE Title elements, the
    order of the keys) is worked out once; each match is then written from its DICOM JSON.
    """

    def __init__(self, request: FindRequest, span: SpanInfo, implicit: bool) -> None:
        fixed = {
            SPECIFIC_CHARACTER_SET: text_element(SPECIFIC_CHARACTER_SET, "CS", [ANSWER_CHARSET], implicit),
            QUERY_RETRIEVE_LEVEL: text_element(QUERY_RETRIEVE_LEVEL, "CS", [request.level.value], implicit),
            RETRIEVE_AE_TITLE: text_element(RETRIEVE_AE_TITLE, "AE", [span.ae_title], implicit),
        }
        plan: list[tuple[int, str, bytes | None]] = [(tag, "", raw) for tag, raw in fixed.items()]
        plan += [(tag, vr, None) for tag, vr in request.requested]
        self._plan = [(tag, f"{tag:08X}", vr, raw) for tag, vr, raw in sorted(plan, key=lambda p: p[0])]
        self._implicit = implicit

    def encode(self, match: Mapping[str, Any]) -> bytes:
        try:
            found = match["dataset"]
            out = []
            for tag, key, vr, raw in self._plan:
                if raw is not None:
                    out.append(raw)
                    continue
                elem = found.get(key)
                if elem is None:  # asked for and unknown: zero length, as PS3.4 C.4.1.1.3.2 asks
                    out.append(text_element(tag, vr, (), self._implicit))
                else:
                    out.append(json_element(tag, elem, self._implicit))
            return b"".join(out)
        except (NotEncodable, KeyError, TypeError, AttributeError) as exc:
            # the API's DICOM JSON is the contract; say which part broke it
            raise ApiFailed(f"unreadable match in the answer: {exc}", 200) from exc


def find_final(answer: Mapping[str, Any]) -> tuple[int, str | None]:
    """The final C-FIND status and, when the answer was cut or partial, a note for the log."""
    returned = len(answer.get("matches") or ())
    total = int(answer.get("total") or 0)
    if total > returned:
        # Study and Patient Root C-FIND have no status for a cut list (0xB001 belongs to the Repository
        # Query model), so the answer ends in Success and the cut is logged.
        return SUCCESS, f"{returned} of {total} matches returned (the span's max_results)"
    if answer.get("status") == "partial":
        nodes = answer.get("nodes") or ()
        failed = [f"{n.get('node')}={n.get('status')}" for n in nodes if n.get("status") != "ok"]
        return SUCCESS, f"partial answer; not ok: {', '.join(failed)}"
    return SUCCESS, None


# -- C-MOVE ----------------------------------------------------------------------------------------------
_MOVE_KEYS: dict[Level, tuple[str, ...]] = {
    Level.STUDY: ("StudyInstanceUID",),
    Level.SERIES: ("StudyInstanceUID", "SeriesInstanceUID"),
    Level.IMAGE: ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"),
}


def _uids(identifier: Dataset, keyword: str) -> list[str]:
    if keyword not in identifier:
        return []
    value = identifier[keyword].value
    if value is None or value == "":
        return []
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    return [str(item).strip() for item in items if str(item).strip()]


def move_request(
    identifier: Dataset, model: InformationModel, span: SpanInfo, destination: str, what: str = "C-MOVE"
) -> dict[str, Any]:
    """A C-MOVE (or C-GET: ``what``) identifier as the body of POST /api/v1/retrievals (unique keys only,
    PS3.4 C.4.2.2.1); a C-GET names its requester as the destination, for the record."""
    level = level_of(identifier, model)
    if level is Level.PATIENT:
        raise UnsupportedRequest(f"PATIENT level {what} is not supported; retrieve by STUDY")
    keys = _MOVE_KEYS[level]
    uids: dict[str, str | list[str]] = {}
    try:
        for depth, keyword in enumerate(keys):
            values = _uids(identifier, keyword)
            if not values:
                raise InvalidIdentifier(f"{keyword} is required for a {level.value} level {what}")
            at_level = depth == len(keys) - 1
            if not at_level and len(values) > 1:
                raise InvalidIdentifier(f"{keyword}: one UID only above the {level.value} level")
            uids[keyword] = values if keyword == "SOPInstanceUID" or len(values) > 1 else values[0]
    except InvalidIdentifier:
        raise
    except Exception as exc:
        raise InvalidIdentifier(f"cannot read the identifier: {exc}") from exc
    return {"level": level.value, "uids": uids, "destination_ae": destination.strip(), "span": span.name}


def _count(event: Mapping[str, Any], key: str) -> int:
    try:
        return max(0, min(_US_MAX, int(event.get(key) or 0)))
    except (TypeError, ValueError):
        return 0


def _with_counts(code: int, event: Mapping[str, Any], remaining: bool, identifier: bytes | None = None,
                 error: str | None = None) -> MoveResult:
    return MoveResult(code, _count(event, "remaining") if remaining else None, _count(event, "completed"),
                      _count(event, "failed"), _count(event, "warning"), identifier,
                      comment(error) if error else None)


def failed_list(uids: Sequence[str], implicit: bool) -> bytes:
    return text_element(FAILED_SOP_INSTANCE_UID_LIST, "UI", [str(uid) for uid in uids], implicit)


def move_pending(progress: Mapping[str, Any]) -> MoveResult:
    return _with_counts(PENDING, progress, remaining=True)


_RESULT_STATUS = {"success": SUCCESS, "warning": MOVE_SUBOPS_WARNING, "failed": API_ERROR}


def move_final(result: Mapping[str, Any], implicit: bool) -> MoveResult:
    """The final C-MOVE response of a result line, with the Failed SOP Instance UID List (C.4.2.1.4)."""
    raw = result.get("dimse_status")
    code = int(raw) if isinstance(raw, int) and 0 <= raw <= _US_MAX else _RESULT_STATUS.get(
        str(result.get("status")), API_ERROR
    )
    failed_uids = [str(uid) for uid in result.get("failed_sop_instance_uids") or ()]
    is_failure = code not in (SUCCESS, MOVE_SUBOPS_WARNING)
    identifier = failed_list(failed_uids, implicit) if code == MOVE_SUBOPS_WARNING or failed_uids else None
    error = str(result.get("error") or "") if is_failure else None
    return _with_counts(code, result, False, identifier, error)


def move_cancelled(progress: Mapping[str, Any] | None, implicit: bool) -> MoveResult:
    """Cancel (0xFE00) with the counts so far; which instances failed is not known here."""
    return _with_counts(CANCEL, progress or {}, True, failed_list((), implicit))


def move_failure(exc: ScpError, progress: Mapping[str, Any] | None) -> MoveResult:
    code, note = failure(exc)
    return _with_counts(code, progress or {}, False, None, note)
