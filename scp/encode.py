"""Data sets on the wire (Little Endian, Implicit or Explicit VR) straight from the DICOM JSON model.

A C-FIND answer arrives from the API as DICOM JSON (PS3.18 F.2) and leaves as one pending response per
match. Query keys are text almost always (names, dates, UIDs, codes), so text elements are written here
directly from their JSON values; any other element (numbers in binary VRs, sequences, bulk data) goes
through pydicom, one element at a time. Text is written in UTF-8: the answers say ISO_IR 192.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC",
                      "UI", "UR", "UT"})
LONG_LENGTH_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT"})
_SHORT = struct.Struct("<HH2sH")
_LONG = struct.Struct("<HH2sHI")
_IMPLICIT = struct.Struct("<HHI")
_SHORT_MAX = 0xFFFF


class NotEncodable(ValueError):
    """A JSON element that is not valid DICOM JSON for its VR."""


def element(tag: int, vr: str, raw: bytes, implicit: bool) -> bytes:
    """One element: header and value (``raw`` already padded to even length)."""
    group, number = tag >> 16, tag & 0xFFFF
    if implicit:
        return _IMPLICIT.pack(group, number, len(raw)) + raw
    if vr in LONG_LENGTH_VRS:
        return _LONG.pack(group, number, vr.encode(), 0, len(raw)) + raw
    if len(raw) > _SHORT_MAX:
        raise NotEncodable(f"({group:04X},{number:04X}) {vr}: {len(raw)} bytes do not fit its length field")
    return _SHORT.pack(group, number, vr.encode(), len(raw)) + raw


def text_element(tag: int, vr: str, values: Iterable[str], implicit: bool) -> bytes:
    """A text element from its values (joined by backslash), UTF-8, padded as its VR asks."""
    raw = "\\".join(values).encode("utf-8")
    if len(raw) % 2:
        raw += b"\0" if vr == "UI" else b" "
    return element(tag, vr, raw, implicit)


def _person_name(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, Mapping):  # {"Alphabetic": ..., "Ideographic": ..., "Phonetic": ...}
        groups = [str(value.get(key) or "") for key in ("Alphabetic", "Ideographic", "Phonetic")]
        while groups and not groups[-1]:
            groups.pop()
        return "=".join(groups)
    raise NotEncodable(f"a PN value is an object, not {type(value).__name__}")


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise NotEncodable(f"a text value is a string or number, not {type(value).__name__}")
    return str(value)


def json_element(tag: int, raw: Mapping[str, Any], implicit: bool) -> bytes:
    """One element of the DICOM JSON model on the wire: text directly, anything else through pydicom."""
    vr = raw.get("vr")
    if not isinstance(vr, str) or len(vr) != 2:
        raise NotEncodable(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) has no VR")
    values = raw.get("Value")
    direct = vr in TEXT_VRS and "BulkDataURI" not in raw and "InlineBinary" not in raw
    if vr == "DS" and isinstance(values, list) and any(not isinstance(v, str | None) for v in values):
        direct = False  # a JSON number as DS: pydicom formats it within the 16 characters of DS
    if direct:
        if values is None:
            return element(tag, vr, b"", implicit)
        if not isinstance(values, list):
            raise NotEncodable(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) Value is not a list")
        convert = _person_name if vr == "PN" else _text
        return text_element(tag, vr, (convert(v) for v in values), implicit)
    return _through_pydicom(tag, raw, implicit)


def _through_pydicom(tag: int, raw: Mapping[str, Any], implicit: bool) -> bytes:
    try:
        ds = Dataset.from_json({f"{tag:08X}": dict(raw)})
        buffer = DicomBytesIO()
        buffer.is_little_endian = True
        buffer.is_implicit_VR = implicit
        write_dataset(buffer, ds, parent_encoding="utf_8")  # text in a sequence: UTF-8 as well
        return buffer.getvalue()
    except Exception as exc:  # pydicom rejects a value for its VR
        raise NotEncodable(f"({tag >> 16:04X},{tag & 0xFFFF:04X}): {exc}") from exc


def decode(data: bytes, implicit: bool) -> Dataset:
    """A request identifier as a pydicom Dataset (once per request); values decode on access."""
    return read_dataset(BytesIO(data), implicit, True)
