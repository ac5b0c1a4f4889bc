"""An in-memory Query/Retrieve index over instance datasets, answering C-FIND identifiers.

Instances are split once into patient, study, series and instance records linked to their
parents, with the computed attributes (NumberOf..., ModalitiesInStudy, SOPClassesInStudy) filled
in, and every value kept as a tuple of strings so matching never touches pydicom per record.
A record answers for its own attributes and its ancestors': that is what makes study-root
queries carry patient keys and patient-root queries below PATIENT level relational.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from simulator.matching import Matcher, compile_matcher, is_universal
from spanner.dicom_constants import QUERY_RETRIEVE_LEVEL, RETRIEVE_AE_TITLE, SPECIFIC_CHARACTER_SET, Status
from spanner.query import MODEL_LEVELS, InformationModel, Level

DEFAULT_CHARSET = "ISO_IR 192"
LEVEL_ORDER: dict[Level, int] = {Level.PATIENT: 0, Level.STUDY: 1, Level.SERIES: 2, Level.IMAGE: 3}

PATIENT_ATTRIBUTES = frozenset({
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex",
    "OtherPatientIDs", "OtherPatientNames", "EthnicGroup", "PatientComments", "NumberOfPatientRelatedStudies",
    "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances",
})
STUDY_ATTRIBUTES = frozenset({
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
    "ReferringPhysicianName", "NameOfPhysiciansReadingStudy", "AdmittingDiagnosesDescription", "PatientAge",
    "PatientSize", "PatientWeight", "Occupation", "AdditionalPatientHistory", "ModalitiesInStudy",
    "SOPClassesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "InstitutionName",
})
SERIES_ATTRIBUTES = frozenset({
    "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "SeriesDate", "SeriesTime",
    "BodyPartExamined", "ProtocolName", "Laterality", "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime", "NumberOfSeriesRelatedInstances",
})
# Set by the index itself, never matched or copied from the instances.
_CONTROL = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle"})
_BINARY_VRS = frozenset({"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN", "AT"})
_INT_VRS = frozenset({"US", "UL", "SS", "SL", "UV", "SV"})
_FLOAT_VRS = frozenset({"FL", "FD"})


class IdentifierError(ValueError):
    """The identifier cannot be answered; ``status`` is the C-FIND failure status to send."""

    def __init__(self, message: str, status: int = Status.IDENTIFIER_DOES_NOT_MATCH) -> None:
        super().__init__(message, status)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return self.message


def attribute_level(keyword: str) -> Level:
    """The level whose records hold ``keyword``; anything not listed belongs to the instance."""
    if keyword in PATIENT_ATTRIBUTES:
        return Level.PATIENT
    if keyword in STUDY_ATTRIBUTES:
        return Level.STUDY
    if keyword in SERIES_ATTRIBUTES:
        return Level.SERIES
    return Level.IMAGE


@dataclass(eq=False, slots=True)
class Record:
    """One patient, study, series or instance with its own attributes and a link to its parent."""

    level: Level
    values: dict[str, tuple[str, ...]]
    parent: Record | None = None
    children: list[Record] = field(default_factory=list)

    def lookup(self, keyword: str) -> tuple[str, ...]:
        """The value of ``keyword`` here or in an ancestor; () when none holds it."""
        record: Record | None = self
        while record is not None:
            value = record.values.get(keyword)
            if value is not None:
                return value
            record = record.parent
        return ()

    def descendants(self, level: Level) -> Iterator[Record]:
        if self.level == level:
            yield self
            return
        for child in self.children:
            yield from child.descendants(level)


def _strings(value: object) -> tuple[str, ...]:
    """A data element value as strings, one per value; () for an empty element."""
    if value is None or value == "":
        return ()
    if isinstance(value, MultiValue | list | tuple):
        return tuple(str(v) for v in value)
    return (str(value),)


def _element_value(vr: str, values: tuple[str, ...]) -> object:
    """A value pydicom accepts for ``vr``; None (empty) when the record has none."""
    if vr == "SQ":
        return []
    if not values or vr in _BINARY_VRS:
        return None
    if vr in _INT_VRS or vr in _FLOAT_VRS:
        cast = int if vr in _INT_VRS else float
        numbers = [cast(v) for v in values]
        return numbers[0] if len(numbers) == 1 else numbers
    return "\\".join(values)


@dataclass(frozen=True, slots=True)
class _Key:
    tag: int
    keyword: str
    vr: str
    value: str


class Index:
    """The records of one simulated node and the C-FIND logic over them."""

    def __init__(self, instances: Iterable[Dataset], ae_title: str = "", charset: str | None = None) -> None:
        self.ae_title = ae_title
        self.charset: str | None = charset
        self._patients: dict[tuple[str, str], Record] = {}
        self._by_uid: dict[Level, dict[str, Record]] = {Level.STUDY: {}, Level.SERIES: {}, Level.IMAGE: {}}
        for ds in instances:
            self._add(ds)
        self.charset = self.charset or DEFAULT_CHARSET
        self._compute()

    def _add(self, ds: Dataset) -> None:
        if self.charset is None and "SpecificCharacterSet" in ds:
            self.charset = "\\".join(_strings(ds.SpecificCharacterSet)) or None
        parts: dict[Level, dict[str, tuple[str, ...]]] = {level: {} for level in Level}
        for elem in ds:
            keyword = elem.keyword
            if not keyword or elem.tag.group == 0x0002 or keyword in _CONTROL or elem.VR in _BINARY_VRS:
                continue
            parts[attribute_level(keyword)][keyword] = _strings(elem.value)
        own = parts[Level.PATIENT]
        patient_key = (_first(own, "PatientID"), _first(own, "IssuerOfPatientID"))
        patient = self._patients.get(patient_key)
        if patient is None:
            patient = self._patients[patient_key] = Record(Level.PATIENT, parts[Level.PATIENT])
        parent = patient
        for level, uid_keyword in ((Level.STUDY, "StudyInstanceUID"), (Level.SERIES, "SeriesInstanceUID"),
                                   (Level.IMAGE, "SOPInstanceUID")):
            uid = _first(parts[level], uid_keyword)
            if not uid:
                raise ValueError(f"an instance without {uid_keyword} cannot be indexed")
            record = self._by_uid[level].get(uid)
            if record is None:
                record = self._by_uid[level][uid] = Record(level, parts[level], parent)
                parent.children.append(record)
            parent = record

    def _compute(self) -> None:
        """The attributes a PACS computes rather than stores (PS3.4 C.3.4, C.3.5)."""
        for series in self._by_uid[Level.SERIES].values():
            series.values["NumberOfSeriesRelatedInstances"] = (str(len(series.children)),)
        for study in self._by_uid[Level.STUDY].values():
            instances = [i for s in study.children for i in s.children]
            study.values["NumberOfStudyRelatedSeries"] = (str(len(study.children)),)
            study.values["NumberOfStudyRelatedInstances"] = (str(len(instances)),)
            modalities = {m for s in study.children for m in s.lookup("Modality")}
            study.values["ModalitiesInStudy"] = tuple(sorted(modalities))
            classes = {c for i in instances for c in i.lookup("SOPClassUID")}
            study.values["SOPClassesInStudy"] = tuple(sorted(classes))
        for patient in self._patients.values():
            series_count = sum(len(study.children) for study in patient.children)
            instance_count = sum(len(s.children) for study in patient.children for s in study.children)
            patient.values["NumberOfPatientRelatedStudies"] = (str(len(patient.children)),)
            patient.values["NumberOfPatientRelatedSeries"] = (str(series_count),)
            patient.values["NumberOfPatientRelatedInstances"] = (str(instance_count),)

    def records(self, level: Level) -> list[Record]:
        """Every record at ``level``, in the order the instances came."""
        if level == Level.PATIENT:
            return list(self._patients.values())
        return list(self._by_uid[level].values())

    def search(self, level: Level, filters: Mapping[str, str]) -> Iterator[Record]:
        """Records at ``level`` matching ``filters`` (keyword -> DICOM matching value).

        Keys of levels below ``level`` are ignored (universal), as a PACS ignores keys it cannot
        match; keys of ``level`` and above match relationally.
        """
        matchers: list[tuple[str, Matcher]] = []
        for keyword, value in filters.items():
            if keyword in _CONTROL or LEVEL_ORDER[attribute_level(keyword)] > LEVEL_ORDER[level]:
                continue
            tag = tag_for_keyword(keyword)
            matcher = compile_matcher(_dictionary_vr(tag, "LO") if tag is not None else "LO", value)
            if matcher is not None:
                matchers.append((keyword, matcher))
        candidates = self._candidates(level, filters)
        return (r for r in candidates if all(matcher(r.lookup(keyword)) for keyword, matcher in matchers))

    def _candidates(self, level: Level, filters: Mapping[str, str]) -> Iterable[Record]:
        """Narrow by the most specific UID list given, so a UID query does not scan every record."""
        for uid_level, keyword in ((Level.IMAGE, "SOPInstanceUID"), (Level.SERIES, "SeriesInstanceUID"),
                                   (Level.STUDY, "StudyInstanceUID")):
            value = filters.get(keyword, "")
            if LEVEL_ORDER[uid_level] > LEVEL_ORDER[level] or is_universal(value):
                continue
            table = self._by_uid[uid_level]
            wanted = dict.fromkeys(u.strip() for u in value.split("\\"))
            found = [table[uid] for uid in wanted if uid in table]
            return (d for record in found for d in record.descendants(level))
        return self.records(level)

    def find(self, identifier: Dataset, model: InformationModel | str) -> Iterator[Dataset]:
        """Response identifiers for a C-FIND request; raises IdentifierError before yielding any.

        Each response holds exactly the requested keys (empty when the record has no value) plus
        QueryRetrieveLevel, SpecificCharacterSet and RetrieveAETitle.
        """
        level = self._level_of(identifier, InformationModel(model))
        keys = _request_keys(identifier)
        matches = self.search(level, {key.keyword: key.value for key in keys if key.keyword})
        return (self._response(record, level, keys) for record in matches)

    @staticmethod
    def _level_of(identifier: Dataset, model: InformationModel) -> Level:
        raw = "".join(_strings(identifier.get("QueryRetrieveLevel", ""))).strip().upper()
        try:
            level = Level(raw)
        except ValueError:
            raise IdentifierError(f"QueryRetrieveLevel {raw!r} is missing or not one of "
                                  f"{', '.join(Level)}") from None
        if level not in MODEL_LEVELS[model]:
            raise IdentifierError(f"level {level} is not part of the {model} information model")
        return level

    def _response(self, record: Record, level: Level, keys: Sequence[_Key]) -> Dataset:
        """Built as a tag -> element dict: pydicom's per-attribute setattr dominates large answers."""
        charset = self.charset or DEFAULT_CHARSET
        elements = [
            _element(SPECIFIC_CHARACTER_SET, "CS", charset),
            _element(QUERY_RETRIEVE_LEVEL, "CS", level.value),
            _element(RETRIEVE_AE_TITLE, "AE", self.ae_title or None),
        ]
        for key in keys:
            values = record.lookup(key.keyword) if key.keyword else ()
            elements.append(_element(key.tag, key.vr, _element_value(key.vr, values)))
        return Dataset({elem.tag: elem for elem in elements})


def _element(tag: int, vr: str, value: object) -> DataElement:
    # Values come from datasets pydicom already accepted: validating them again per response is waste.
    return DataElement(tag, vr, value, validation_mode=config.IGNORE)


def _dictionary_vr(tag: int, fallback: str) -> str:
    """The dictionary VR; for ambiguous ones ('US or SS') the element's own VR, else the first."""
    vr = str(dictionary_VR(tag))
    if " or " not in vr:
        return vr
    return fallback if fallback in vr.split(" or ") else vr.split(" or ")[0]


def _first(values: Mapping[str, tuple[str, ...]], keyword: str) -> str:
    found = values.get(keyword, ())
    return found[0].strip() if found else ""


def _request_keys(identifier: Dataset) -> list[_Key]:
    """The requested keys with their matching values; control attributes left out."""
    keys: list[_Key] = []
    for elem in identifier:
        keyword = elem.keyword
        if keyword in _CONTROL or elem.tag.group in (0x0000, 0x0002):
            continue
        vr = _dictionary_vr(elem.tag, elem.VR) if keyword else elem.VR
        if vr == "SQ" or elem.VR == "SQ":
            keys.append(_Key(int(elem.tag), keyword, "SQ", ""))
            continue
        try:
            value = "\\".join(_strings(elem.value))
        except Exception as exc:  # a value pydicom cannot decode is unusable for matching
            raise IdentifierError(f"{keyword or elem.tag}: unreadable value ({exc})",
                                  Status.UNABLE_TO_PROCESS) from exc
        keys.append(_Key(int(elem.tag), keyword, vr, value))
    return keys
