"""QIDO-RS (PS3.18 §10.6) over a span: the DICOMweb search turned into one spanning query.

The search parameters become a ``QueryIn`` and run through ``serve_app.usecases.query.run_query``,
the door every spanning query takes (admission, cache, fan-out, merge, record, audit); this module only
holds the rules of QIDO-RS around it:

- parameters: matching keys by keyword or tag, ``includefield`` (a list, repeated, or ``all``),
  ``limit`` / ``offset`` over the merged answer, ``fuzzymatching``; anything else is a bad parameter;
- the answer: per level the attributes of PS3.18 Table 6.7.1-2 (with the study's attributes at series
  and instance level too, as Orthanc-DICOMweb answers), the included fields and the matching keys, a
  ``RetrieveURL`` on this front, ``SpecificCharacterSet`` ISO_IR 192 (the JSON is UTF-8);
- counts of a study that several archives hold are counted again over its series (each archive counts
  only what it holds; the merge keeps the largest count, which is right for copies, wrong for a split);
- warnings: an archive that failed or was late, a declined ``fuzzymatching``, more matches than returned.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import tag_for_keyword

from serve_app.api_models import MAX_LIST_VALUES, QueryIn
from serve_app.records import Job
from serve_app.services import Services
from serve_app.usecases import query
from spanner.errors import InvalidQuery
from spanner.query import Level, check_matchable, normalise_value, resolve_keyword
from spanner.storage import Audit

JSON_MEDIA_TYPE = "application/dicom+json"
ISO_IR_192 = "ISO_IR 192"
FUZZY_DECLINED = "The fuzzymatching parameter is not supported. Only literal matching has been performed."
MORE_RESULTS = ("The number of results exceeded the maximum supported by the server. Additional results "
                "can be requested.")

_STUDY = (
    "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "ReferringPhysicianName",
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
    "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
)
_STUDY_OF_SERIES = tuple(k for k in _STUDY if k not in (
    "ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"))
_SERIES = (
    "Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber", "NumberOfSeriesRelatedInstances",
    "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
)
_INSTANCE = ("SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "BitsAllocated",
             "NumberOfFrames")
DEFAULT_ATTRIBUTES: dict[Level, tuple[str, ...]] = {
    Level.STUDY: _STUDY,
    Level.SERIES: _STUDY_OF_SERIES + _SERIES,
    Level.IMAGE: _STUDY_OF_SERIES + _SERIES + _INSTANCE,
}
"""What each level answers without includefield: PS3.18 Table 6.7.1-2, -2a, -2b (the sequence
RequestAttributesSequence left out: a C-FIND return key cannot be a sequence here)."""
_MORE = ("StudyDescription", "InstitutionName", "IssuerOfPatientID", "OtherPatientIDs", "PatientAge",
         "PatientSize", "PatientWeight", "SOPClassesInStudy", "NameOfPhysiciansReadingStudy")
_MORE_SERIES = ("SeriesDate", "SeriesTime", "BodyPartExamined", "ProtocolName", "Laterality",
                "OperatorsName", "PerformingPhysicianName", "StationName", "Manufacturer")
_MORE_INSTANCE = ("ContentDate", "ContentTime", "AcquisitionDate", "AcquisitionTime", "ImageType",
                  "SamplesPerPixel", "PhotometricInterpretation", "BitsStored", "HighBit",
                  "PixelRepresentation", "AcquisitionNumber", "ImageComments", "InstanceCreationDate",
                  "InstanceCreationTime")
ALL_ATTRIBUTES: dict[Level, tuple[str, ...]] = {
    Level.STUDY: _STUDY + _MORE,
    Level.SERIES: DEFAULT_ATTRIBUTES[Level.SERIES] + _MORE + _MORE_SERIES,
    Level.IMAGE: DEFAULT_ATTRIBUTES[Level.IMAGE] + _MORE + _MORE_SERIES + _MORE_INSTANCE,
}
"""``includefield=all``: every attribute of the level an archive is commonly asked for over C-FIND
(C-FIND returns only what is asked, so "all" is this list, not every attribute of every instance)."""

PER_ARCHIVE_KEYS = frozenset({"ModalitiesInStudy", "SOPClassesInStudy"})
"""Study attributes each archive answers from its own part of a study: matching on them can leave out
an archive that holds the rest."""
_TRUE_FALSE = {"true": True, "false": False}
_PARENTS = {"StudyInstanceUID": "study", "SeriesInstanceUID": "series"}
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_SPECIFIC_CHARACTER_SET = "00080005"
_RETRIEVE_URL = "00081190"
_DROPPED = frozenset({"00080052", "00080054"})  # QueryRetrieveLevel, RetrieveAETitle: DIMSE's, not the web's


def tag_of(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return f"{tag:08X}"


_UID_TAGS = {Level.STUDY: tag_of("StudyInstanceUID"), Level.SERIES: tag_of("SeriesInstanceUID"),
             Level.IMAGE: tag_of("SOPInstanceUID")}
_SERIES_COUNT = tag_of("NumberOfStudyRelatedSeries")
_INSTANCE_COUNT = tag_of("NumberOfStudyRelatedInstances")
_SERIES_INSTANCES = tag_of("NumberOfSeriesRelatedInstances")


class BadParameter(InvalidQuery):
    """A search parameter QIDO-RS cannot take (HTTP 400); the message names it."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter
        self.args = (parameter, message)


@dataclass(frozen=True, slots=True)
class Search:
    """A QIDO-RS request after its parameters were checked."""

    level: Level
    filters: dict[str, str | list[str]]
    include: tuple[str, ...]
    include_all: bool
    limit: int | None
    offset: int
    fuzzy: bool

    def attributes(self) -> tuple[str, ...]:
        """Keywords the answer carries: the level's, the included ones, the matching keys."""
        base = ALL_ATTRIBUTES[self.level] if self.include_all else DEFAULT_ATTRIBUTES[self.level]
        return tuple(dict.fromkeys((*base, *self.include, *self.filters)))


def check_uid(parameter: str, value: str) -> str:
    """A UID from the path or a parameter; 400 otherwise."""
    if len(value) > 64 or not _UID.fullmatch(value):
        raise BadParameter(parameter, f"{value[:70]!r} is not a UID (digits and dots, at most 64 characters)")
    return value


def parse(
    level: Level, params: Sequence[tuple[str, str]], study: str | None = None, series: str | None = None
) -> Search:
    """The search of a QIDO-RS request: ``params`` as they came (repeats kept), the UIDs of its path."""
    filters: dict[str, str | list[str]] = {}
    include: list[str] = []
    include_all = False
    limit: int | None = None
    offset = 0
    fuzzy = False
    given: dict[str, str] = {}  # keyword -> the parameter name that gave it
    for name, value in params:
        if name == "includefield":
            for item in (part.strip() for part in value.split(",")):
                if item == "all":
                    include_all = True
                elif item:
                    include.append(_keyword(name, item, "an included field"))
            continue
        if name == "limit":
            limit = _number(name, value, minimum=1)
            continue
        if name == "offset":
            offset = _number(name, value, minimum=0)
            continue
        if name == "fuzzymatching":
            if value.lower() not in _TRUE_FALSE:
                raise BadParameter(name, f"{value[:40]!r} is neither true nor false")
            fuzzy = _TRUE_FALSE[value.lower()]
            continue
        keyword = _keyword(name, name, "a matching key")
        if keyword in given:
            raise BadParameter(name, f"names {keyword}, which {given[keyword]!r} gives already; give a list "
                                     "of UIDs as one value, separated by ',' or '\\'")
        given[keyword] = name
        filters[keyword] = _matching_value(name, keyword, value)
    for keyword, uid in (("StudyInstanceUID", study), ("SeriesInstanceUID", series)):
        if uid is None:
            continue
        check_uid(_PARENTS[keyword], uid)
        if keyword in given:
            raise BadParameter(given[keyword], f"the path names the {_PARENTS[keyword]} already")
        filters[keyword] = uid
    return Search(level, filters, tuple(dict.fromkeys(include)), include_all, limit, offset, fuzzy)


def _keyword(parameter: str, text: str, role: str) -> str:
    try:
        keyword = resolve_keyword(text)
        if keyword in ("QueryRetrieveLevel", "SpecificCharacterSet"):
            raise InvalidQuery(f"{keyword} is set by the server")
        check_matchable(keyword, role)
    except InvalidQuery as exc:
        hint = "; search parameters are a DICOM keyword or tag, limit, offset, includefield, fuzzymatching"
        raise BadParameter(parameter, exc.message + (hint if role == "a matching key" else "")) from None
    return keyword


def _number(parameter: str, value: str, minimum: int) -> int:
    if not re.fullmatch(r"[0-9]{1,9}", value.strip()) or int(value) < minimum:
        raise BadParameter(parameter, f"{value[:40]!r} is not a whole number >= {minimum}")
    return int(value)


def _matching_value(parameter: str, keyword: str, value: str) -> str | list[str]:
    """UIDs may be a list, separated by ',' or '\\' (PS3.18 §8.3.4.1); other values go as written."""
    try:
        if check_matchable(keyword, "a matching key") == "UI":
            uids = [part.strip() for part in re.split(r"[,\\]", value) if part.strip()]
            if len(uids) > MAX_LIST_VALUES:
                raise InvalidQuery(f"{len(uids)} UIDs; at most {MAX_LIST_VALUES} in one search")
            for uid in uids:
                normalise_value(keyword, uid)
            return uids if len(uids) > 1 else "".join(uids)
        normalise_value(keyword, value)
    except InvalidQuery as exc:
        message = exc.message.removeprefix(f"{keyword}: ")
        raise BadParameter(parameter, message) from None
    return value


# -- answering ------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class QidoAnswer:
    status: int
    """200, or 502 when the query failed under its span's failure strategy."""
    body: Any
    """The matches (a DICOM JSON array), or on failure ``{"detail": ..., "nodes": [...]}``."""
    warnings: list[str]
    """Texts of ``Warning: 299`` headers, one per failed archive or declined feature."""
    record: Job
    """As ``query.Answer.record``: hand it to the record writer once the answer has gone."""


async def search(
    s: Services, span: str, search_: Search, audit: Audit, requester: str, root: str, *,
    read_cache: bool = True, store: bool = True, arrived: float | None = None,
) -> QidoAnswer:
    """Run ``search_`` on ``span``; ``root`` is this front's URL for the span (for RetrieveURL).
    ``read_cache`` / ``store``: as for ``query.run_query`` (Cache-Control no-cache / no-store)."""
    attributes = search_.attributes()
    body = QueryIn(level=search_.level, filters=dict(search_.filters), return_keys=list(attributes),
                   span=span, limit=search_.limit, offset=search_.offset)
    answer = await query.run_query(s, body, audit, requester, read_cache=read_cache, store=store,
                                   arrived=arrived, cap_limit=True)
    result = answer.body
    warnings = [f"archive {o['node']}: {o['status']}" + (f" ({o['error']})" if o.get("error") else "")
                for o in result["nodes"] if o["status"] != "ok"]
    if search_.fuzzy:
        warnings.append(FUZZY_DECLINED)
    if answer.status != 200:
        failed = {"detail": f"the search failed under span {span!r}'s failure strategy: "
                            f"{result.get('reason') or result['status']}", "nodes": result["nodes"]}
        return QidoAnswer(answer.status, failed, warnings, answer.record)
    # Copies: the answer as the archives gave it is what the query cache stores, once the record is written.
    matches: list[dict[str, Any]] = [{"dataset": dict(m["dataset"]), "nodes": list(m["nodes"])}
                                     for m in result["matches"]]
    if search_.level is Level.STUDY and matches and PER_ARCHIVE_KEYS & set(search_.filters):
        await _complete_studies(s, span, matches, attributes, audit, requester, read_cache)
    if search_.level is Level.STUDY and _counted(attributes):
        await _recount_split_studies(s, span, matches, audit, requester, read_cache)
    shown = search_.offset + len(matches)
    if result["total"] > shown and (search_.limit is None or search_.limit > len(matches)):
        warnings.append(MORE_RESULTS)
    keep = None if search_.include_all else {tag_of(k) for k in attributes}
    datasets = [_shaped(search_.level, m["dataset"], keep, root) for m in matches]
    return QidoAnswer(200, datasets, warnings, answer.record)


async def _complete_studies(
    s: Services, span: str, matches: list[dict[str, Any]], attributes: tuple[str, ...], audit: Audit,
    requester: str, read_cache: bool,
) -> None:
    """The whole of each study on the page, where a matching key may have left out archives that hold
    part of it: the archive holding only the CT series of a CT+MR study does not match
    ModalitiesInStudy=MR, yet its series belong to the answer's modalities and counts. One more
    spanning query, by the page's study UIDs alone."""
    page = {uid: m for m in matches if (uid := _first(m["dataset"], _UID_TAGS[Level.STUDY])) is not None}
    if not page:
        return
    body = QueryIn(level=Level.STUDY, filters={"StudyInstanceUID": sorted(page)},
                   return_keys=list(attributes), span=span, limit=len(page), offset=0)
    answer = await query.run_query(s, body, audit, requester, read_cache=read_cache, cap_limit=True)
    await s.records.submit(answer.record)
    if answer.status != 200:
        return  # the page as first found stays: its studies did match
    for whole in answer.body["matches"]:
        match = page.get(_first(whole["dataset"], _UID_TAGS[Level.STUDY]) or "")
        if match is not None:
            match["dataset"], match["nodes"] = dict(whole["dataset"]), list(whole["nodes"])


def _counted(attributes: Iterable[str]) -> bool:
    return bool({"NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"} & set(attributes))


async def _recount_split_studies(
    s: Services, span: str, matches: list[dict[str, Any]], audit: Audit, requester: str, read_cache: bool
) -> None:
    """Counts of each study on the page that more than one archive holds, from its series: the distinct
    series, and per series the largest instance count any archive gives (an archive that holds a series
    is taken to hold it whole). One more spanning query, only when such a study is on the page."""
    split = {_first(m["dataset"], _UID_TAGS[Level.STUDY]): m for m in matches if len(m["nodes"]) > 1}
    split.pop(None, None)
    if not split:
        return
    body = QueryIn(level=Level.SERIES, filters={"StudyInstanceUID": sorted(str(uid) for uid in split)},
                   return_keys=["StudyInstanceUID", "NumberOfSeriesRelatedInstances"], span=span,
                   offset=0)
    answer = await query.run_query(s, body, audit, requester, read_cache=read_cache, cap_limit=True)
    await s.records.submit(answer.record)  # the archives were asked: the audit trail says so
    if answer.status != 200 or answer.body["status"] != "success" or answer.body["total"] > len(
            answer.body["matches"]):
        return  # a partial or capped series list would count less than the archives said: keep theirs
    series: dict[str, int] = {}
    instances: dict[str, int] = {}
    for found in answer.body["matches"]:
        study = _first(found["dataset"], _UID_TAGS[Level.STUDY])
        if study is None:
            continue
        series[study] = series.get(study, 0) + 1
        instances[study] = instances.get(study, 0) + (_int(found["dataset"].get(_SERIES_INSTANCES)) or 0)
    for uid, match in split.items():
        if uid in series:
            dataset = match["dataset"]
            dataset[_SERIES_COUNT] = {"vr": "IS", "Value": [series[uid]]}
            dataset[_INSTANCE_COUNT] = {"vr": "IS", "Value": [instances[uid]]}


def _first(dataset: dict[str, Any], tag: str) -> str | None:
    values = (dataset.get(tag) or {}).get("Value") or [None]
    return None if values[0] is None else str(values[0])


def _int(attribute: Any) -> int | None:
    try:
        return int(str(attribute["Value"][0]).strip())
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def _shaped(level: Level, dataset: dict[str, Any], keep: set[str] | None, root: str) -> dict[str, Any]:
    """The match as QIDO-RS answers it: only the asked attributes, in tag order, with the character set
    of the JSON and the resource's URL on this front."""
    out = {tag: attr for tag, attr in dataset.items()
           if tag not in _DROPPED and (keep is None or tag in keep)}
    out[_SPECIFIC_CHARACTER_SET] = {"vr": "CS", "Value": [ISO_IR_192]}
    url = retrieve_url(level, dataset, root)
    if url is not None:
        out[_RETRIEVE_URL] = {"vr": "UR", "Value": [url]}
    return dict(sorted(out.items()))


def retrieve_url(level: Level, dataset: dict[str, Any], root: str) -> str | None:
    """``{root}/studies/{study}[/series/{series}[/instances/{sop}]]`` of a match (PS3.18 §10.6.3.3)."""
    parts = [("studies", _UID_TAGS[Level.STUDY])]
    if level in (Level.SERIES, Level.IMAGE):
        parts.append(("series", _UID_TAGS[Level.SERIES]))
    if level is Level.IMAGE:
        parts.append(("instances", _UID_TAGS[Level.IMAGE]))
    path = root
    for segment, tag in parts:
        uid = _first(dataset, tag)
        if uid is None:
            return None
        path += f"/{segment}/{uid}"
    return path


def warning_header(agent: str, text: str) -> str:
    """One ``Warning`` value (RFC 7234 §5.5: ``299 agent "text"``), in printable ASCII."""
    clean = text.replace("\\", "/").replace('"', "'")
    clean = clean.encode("ascii", "backslashreplace").decode("ascii")
    clean = "".join(char if " " <= char <= "~" else " " for char in clean)[:1000]
    return f'299 {agent} "{clean}"'
