"""The query model: levels, keys, DICOM matching values, and the identifier sent to a PACS.

Everything a client may write in ``filters`` is checked here once, in the ingress, so that a
bad value is a 422 with a message and never a PACS error later.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset

from spanner.errors import InvalidQuery


class Level(StrEnum):
    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


class InformationModel(StrEnum):
    PATIENT_ROOT = "patient_root"
    STUDY_ROOT = "study_root"


# The identity key: the attributes that identify one entity at each level, so that copies of it held by
# several archives merge into one match.
IDENTITY_KEYS: dict[Level, tuple[str, ...]] = {
    Level.PATIENT: ("PatientID", "IssuerOfPatientID"),
    Level.STUDY: ("StudyInstanceUID",),
    Level.SERIES: ("SeriesInstanceUID",),
    Level.IMAGE: ("SOPInstanceUID",),
}

# Date and time that order matches at each level (newest first), then the identity key.
ORDER_KEYS: dict[Level, tuple[str, str] | None] = {
    Level.PATIENT: None,
    Level.STUDY: ("StudyDate", "StudyTime"),
    Level.SERIES: ("SeriesDate", "SeriesTime"),
    Level.IMAGE: ("ContentDate", "ContentTime"),
}

# What every match carries even when the client names no return key.
DEFAULT_RETURN_KEYS: dict[Level, tuple[str, ...]] = {
    Level.PATIENT: (
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientSex",
        "NumberOfPatientRelatedStudies",
    ),
    Level.STUDY: (
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyID",
        "StudyDescription",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    Level.SERIES: (
        "PatientID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "SeriesNumber",
        "SeriesDescription",
        "SeriesDate",
        "SeriesTime",
        "NumberOfSeriesRelatedInstances",
    ),
    Level.IMAGE: (
        "PatientID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "SOPClassUID",
        "InstanceNumber",
        "ContentDate",
        "ContentTime",
    ),
}

# Levels each information model allows (PS3.4 C.6.1 and C.6.2).
MODEL_LEVELS: dict[InformationModel, frozenset[Level]] = {
    InformationModel.PATIENT_ROOT: frozenset(Level),
    InformationModel.STUDY_ROOT: frozenset({Level.STUDY, Level.SERIES, Level.IMAGE}),
}

_MAX_LEN = {
    "AE": 16,
    "CS": 16,
    "SH": 16,
    "LO": 64,
    "PN": 64 * 3 + 2,
    "UI": 64,
    "DA": 18,
    "TM": 28,
    "DT": 54,
    "AS": 4,
    "IS": 12,
    "DS": 16,
    "LT": 10240,
    "ST": 1024,
    "UT": 2**32 - 2,
    "UC": 2**32 - 2,
    "UR": 2**32 - 2,
}
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_TIME = re.compile(r"^([01][0-9]|2[0-3])([0-5][0-9]([0-5][0-9](\.[0-9]{1,6})?)?)?$")
_DT = re.compile(
    r"^[0-9]{4}([0-9]{2}([0-9]{2}([0-9]{2}([0-9]{2}([0-9]{2}(\.[0-9]{1,6})?)?)?)?)?)?([+-][0-9]{4})?$"
)
_TAG = re.compile(r"^\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?$")


def resolve_keyword(key: str) -> str:
    """A DICOM keyword for ``key``, given as a keyword or a tag (``00100020``, ``(0010,0020)``)."""
    text = key.strip()
    match = _TAG.match(text)
    if match:
        tag = int(match.group(1) + match.group(2), 16)
        keyword = keyword_for_tag(tag)
        if not keyword:
            raise InvalidQuery(
                f"tag {text} is not in the DICOM data dictionary (private tags cannot be queried)"
            )
        return keyword
    if tag_for_keyword(text) is None:
        raise InvalidQuery(f"unknown DICOM keyword {text!r} (keywords are case-sensitive, e.g. 'PatientID')")
    return text


NOT_MATCHABLE_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "US or OW", "US or SS or OW"}
)
"""Bulk data VRs: PS3.4 C.2.2.2 defines no matching on them, and archives refuse them as keys."""


def check_matchable(keyword: str, role: str) -> str:
    """The keyword's VR; InvalidQuery when it is bulk data or a sequence, which cannot be ``role``."""
    vr = vr_of(keyword)
    if vr in NOT_MATCHABLE_VRS:
        raise InvalidQuery(f"{keyword} is bulk data (VR {vr}) and cannot be {role}; ask for it by retrieval")
    if vr == "SQ":
        raise InvalidQuery(f"{keyword} is a sequence; sequences cannot be {role}")
    return vr


def vr_of(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    assert tag is not None
    return str(dictionary_VR(tag))


def _check_date(keyword: str, text: str) -> dt.date:
    if not re.fullmatch(r"[0-9]{8}", text):
        raise InvalidQuery(f"{keyword}: {text!r} is not a date; write YYYYMMDD, e.g. 20240131")
    try:
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        raise InvalidQuery(f"{keyword}: {text!r} is not a calendar date") from None


def _check_range(keyword: str, vr: str, value: str) -> None:
    """DA, TM and DT accept one value or a range ``A-B``, ``A-`` or ``-B`` with A <= B."""
    parts = value.split("-")  # a DT with a negative UTC offset is not accepted in a range
    if len(parts) > 2:
        raise InvalidQuery(f"{keyword}: {value!r} has more than one '-'; a range is 'start-end'")
    if len(parts) == 2 and not parts[0] and not parts[1]:
        raise InvalidQuery(f"{keyword}: '-' alone is not a range; give a start, an end or both")
    for part in parts:
        if not part:
            continue
        if vr == "DA":
            _check_date(keyword, part)
        elif vr == "TM" and not _TIME.match(part):
            raise InvalidQuery(f"{keyword}: {part!r} is not a time; write HHMMSS, HHMM or HH")
        elif vr == "DT" and not _DT.match(part):
            raise InvalidQuery(f"{keyword}: {part!r} is not a date-time; write YYYYMMDDHHMMSS")
    if len(parts) == 2 and parts[0] and parts[1]:
        a, b = parts
        if vr == "DA" and _check_date(keyword, a) > _check_date(keyword, b):
            raise InvalidQuery(f"{keyword}: range {value!r} ends before it starts")
        if vr in ("TM", "DT") and a.split("+")[0] > b.split("+")[0] and len(a) == len(b):
            raise InvalidQuery(f"{keyword}: range {value!r} ends before it starts")


def normalise_value(keyword: str, raw: object) -> str:
    """The matching value as it goes on the wire; raises InvalidQuery with a readable reason."""
    vr = check_matchable(keyword, "a matching key (sequence matching is not supported)")
    if raw is None:
        return ""
    if isinstance(raw, bool) or not isinstance(raw, str | int | float | list | tuple):
        raise InvalidQuery(f"{keyword}: give a string (or a list of strings for a UID list), not {raw!r}")
    if isinstance(raw, list | tuple):
        items = [str(item).strip() for item in raw]
        if len(items) > 1 and vr != "UI" and vr not in ("CS", "SH", "LO", "AE"):
            raise InvalidQuery(f"{keyword}: list matching is only for UIDs and codes, not VR {vr}")
        if any("\\" in item for item in items):
            raise InvalidQuery(f"{keyword}: a list item may not contain a backslash")
        value = "\\".join(items)
    else:
        value = str(raw).strip()
    if value == "*":
        return ""  # universal matching, written the plain way
    if not value:
        return ""
    parts = value.split("\\")
    for part in parts:
        if len(part) > _MAX_LEN.get(vr, 1024):
            raise InvalidQuery(f"{keyword}: {part[:40]!r}... is longer than VR {vr} allows ({_MAX_LEN[vr]})")
    if vr == "UI":
        for part in parts:
            if not _UID.match(part):
                raise InvalidQuery(f"{keyword}: {part!r} is not a UID (digits and dots, no wildcards)")
    elif vr in ("DA", "TM", "DT"):
        if len(parts) > 1:
            raise InvalidQuery(f"{keyword}: a {vr} value matches one value or one range, not a list")
        if "*" in value or "?" in value:
            raise InvalidQuery(f"{keyword}: wildcards are not allowed on dates and times; use a range")
        _check_range(keyword, vr, value)
    elif vr in ("IS", "US", "UL", "SS", "SL"):
        for part in parts:
            if not re.fullmatch(r"[+-]?[0-9]+", part):
                raise InvalidQuery(f"{keyword}: {part!r} is not an integer")
    elif vr in ("DS", "FL", "FD"):
        for part in parts:
            try:
                float(part)
            except ValueError:
                raise InvalidQuery(f"{keyword}: {part!r} is not a number") from None
    return value


def normalise_filters(filters: Mapping[str, object]) -> dict[str, str]:
    """Filters keyed by keyword with wire values; tags and keywords naming one attribute collide."""
    out: dict[str, str] = {}
    for key, raw in filters.items():
        keyword = resolve_keyword(key)
        if keyword in ("QueryRetrieveLevel", "SpecificCharacterSet"):
            raise InvalidQuery(f"{keyword} is set by the spanner; give the level as 'level'")
        if keyword in out:
            raise InvalidQuery(f"{key!r} names {keyword}, which is given twice")
        out[keyword] = normalise_value(keyword, raw)
    return out


def normalise_return_keys(keys: Iterable[str]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for key in keys:
        keyword = resolve_keyword(key)
        check_matchable(keyword, "a return key")
        seen[keyword] = None
    return tuple(seen)


def information_model_for(level: Level, supported: Iterable[InformationModel]) -> InformationModel | None:
    """Study root where the node supports it and the level allows it, else patient root."""
    models = list(supported)
    for model in (InformationModel.STUDY_ROOT, InformationModel.PATIENT_ROOT):
        if model in models and level in MODEL_LEVELS[model]:
            return model
    return None


@dataclass(frozen=True, slots=True)
class NodeQuery:
    """What one node actor is asked: plain values only, so it pickles cheaply."""

    level: Level
    filters: dict[str, str] = field(default_factory=dict)
    return_keys: tuple[str, ...] = ()
    hops: tuple[str, ...] = ()
    """The dicom-spanner deployments the query already passed (spanner.hops); only spanners see it."""

    def identifier(self, additional_filters: Mapping[str, str] | None = None) -> Dataset:
        """The C-FIND identifier: filters, the node's own filters, then empty return keys."""
        merged = dict(self.filters)
        for key, value in (additional_filters or {}).items():
            merged.setdefault(key, value)
        ds = Dataset()
        if any(not value.isascii() for value in merged.values()):
            ds.SpecificCharacterSet = "ISO_IR 192"  # matching values beyond ASCII travel as UTF-8
        ds.QueryRetrieveLevel = self.level.value
        for keyword in (*DEFAULT_RETURN_KEYS[self.level], *IDENTITY_KEYS[self.level], *self.return_keys):
            if keyword not in merged:
                merged[keyword] = ""
        for keyword, value in merged.items():
            setattr(ds, keyword, value or None)
        return ds


@dataclass(frozen=True, slots=True)
class MoveQuery:
    """One C-MOVE a node actor is asked to run: unique keys of the objects, and where they go."""

    level: Level
    keys: tuple[tuple[str, str], ...]  # keyword -> value; UID lists are backslash-joined
    destination: str
    hops: tuple[str, ...] = ()  # as NodeQuery.hops

    def identifier(self) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = self.level.value
        for keyword, value in self.keys:
            setattr(ds, keyword, value)
        return ds
