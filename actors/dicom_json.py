"""Response identifiers to the DICOM JSON model (PS3.18 F.2), fast.

pydicom's ``to_json_dict`` first turns every raw element into a typed DataElement; for a C-FIND
match that costs about 0.5 ms, most of a node actor's CPU per match. Matches are flat datasets of
strings and numbers in one simple character set, so this module reads the raw bytes directly and
falls back to pydicom for anything else (sequences, ISO 2022 code extensions, binary VRs it does
not know), keeping the result identical to pydicom's.
"""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag

from spanner.outcome import DicomJson

CHARSET = BaseTag(0x00080005)
# Attributes that describe the node's answer rather than the entity; the merged match lists its nodes instead.
DROP = frozenset({CHARSET, 0x00080052, 0x00080054})
_ENCODINGS = {
    "": "ascii",
    "ISO_IR 6": "ascii",
    "ISO_IR 100": "latin_1",
    "ISO_IR 192": "utf_8",
    "ISO_IR 101": "iso8859_2",
    "ISO_IR 109": "iso8859_3",
    "ISO_IR 110": "iso8859_4",
    "ISO_IR 144": "iso_ir_144",
    "ISO_IR 127": "iso_ir_127",
    "ISO_IR 126": "iso_ir_126",
    "ISO_IR 138": "iso_ir_138",
    "ISO_IR 148": "iso_ir_148",
    "GB18030": "GB18030",
    "GBK": "GBK",
}
_TEXT = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UI", "UR", "UT"})
_SPECIFIC = frozenset({"LO", "LT", "SH", "ST", "UC", "UT", "PN"})  # the VRs SpecificCharacterSet applies to
_INTS = {"US": "H", "UL": "I", "SS": "h", "SL": "i", "UV": "Q", "SV": "q"}
_FLOATS = {"FL": "f", "FD": "d"}


class _Unsupported(Exception):
    """Something this fast path does not handle: use pydicom's conversion instead."""


def to_match(identifier: Dataset, little_endian: bool = True) -> DicomJson:
    """A decoded response identifier as DICOM JSON, decoded with its own SpecificCharacterSet."""
    try:
        elements = []
        for tag, element in identifier._dict.items():
            if not isinstance(element, RawDataElement):
                raise _Unsupported
            elements.append((int(tag), element.VR or _vr(tag), element.value or b""))
        return _convert(elements, little_endian)
    except (_Unsupported, ValueError):  # ValueError: undecodable text or a malformed number
        return _reference(identifier)


def from_bytes(raw: bytes, implicit: bool) -> DicomJson:
    """A response identifier straight from its encoded bytes (Little Endian, ``implicit`` VR or not)."""
    try:
        return _convert(_elements(raw, implicit), True)
    except (_Unsupported, ValueError):  # ValueError: undecodable text or a malformed number
        return _reference(read_dataset(BytesIO(raw), implicit, True))


def _reference(identifier: Dataset) -> DicomJson:
    out: dict[str, Any] = identifier.to_json_dict(suppress_invalid_tags=True)
    for tag in DROP:
        out.pop(f"{tag:08X}", None)
    return out


_VRS: dict[int, str | None] = {}  # the data dictionary's VR by tag, None where pydicom must decide


def _vr(tag: int) -> str:
    vr = _VRS.get(tag, "")
    if vr == "":
        try:
            found = str(dictionary_VR(tag))
        except KeyError:
            found = ""  # private or unknown: pydicom decides (UN)
        vr = _VRS[tag] = found if found and " " not in found else None  # not "US or SS" and the like
    if vr is None:
        raise _Unsupported
    return vr


_IMPLICIT = struct.Struct("<HHI")
_EXPLICIT = struct.Struct("<HH2sH")
_LONG = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"})


def _elements(raw: bytes, implicit: bool) -> list[tuple[int, str, bytes]]:
    """(tag, VR, value) of every element of a flat data set; sequences and undefined lengths are not flat."""
    out: list[tuple[int, str, bytes]] = []
    offset, end = 0, len(raw)
    while offset < end:
        if implicit:
            if offset + 8 > end:
                raise _Unsupported
            group, element, length = _IMPLICIT.unpack_from(raw, offset)
            tag = group << 16 | element
            vr = _vr(tag)
            offset += 8
        else:
            if offset + 8 > end:
                raise _Unsupported
            group, element, vr_raw, length = _EXPLICIT.unpack_from(raw, offset)
            tag = group << 16 | element
            offset += 8
            if vr_raw in _LONG:
                if offset + 4 > end:
                    raise _Unsupported
                (length,) = struct.unpack_from("<I", raw, offset)
                offset += 4
            vr = vr_raw.decode("ascii", "replace")
        if length == 0xFFFFFFFF or offset + length > end or vr == "SQ":
            raise _Unsupported
        out.append((tag, vr, raw[offset:offset + length]))
        offset += length
    return out


def _encoding(elements: list[tuple[int, str, bytes]]) -> str:
    raw = None
    for tag, _, value in elements:  # in tag order: (0008,0005) comes before nearly everything
        if tag >= CHARSET:
            raw = value if tag == CHARSET else None
            break
    if raw is None:
        return "ascii"
    text = raw.decode("ascii", "replace")
    terms = [t.strip(" \0") for t in text.split("\\")]
    if len(terms) > 1 or "2022" in text:
        raise _Unsupported  # code extensions need pydicom's ISO 2022 handling
    try:
        return _ENCODINGS[terms[0]]
    except KeyError:
        raise _Unsupported from None


# How each VR's value is read: "multi" backslash-separated and stripped; "single" one value, right-stripped.
_SINGLE = ("LT", "ST", "UT", "UR")
_KIND = {**dict.fromkeys(_TEXT - set(_SINGLE), "multi"), **dict.fromkeys(_SINGLE, "single"),
         "PN": "pn", "IS": "is", "DS": "ds", **dict.fromkeys((*_INTS, *_FLOATS), "number")}
_KEYS: dict[int, str] = {}


def _convert(elements: list[tuple[int, str, bytes]], little_endian: bool) -> DicomJson:
    encoding = _encoding(elements)
    out: dict[str, Any] = {}
    for tag, vr, raw in elements:
        if tag in DROP:
            continue
        key = _KEYS.get(tag)
        if key is None:
            key = _KEYS[tag] = f"{tag:08X}"
        if not raw:
            out[key] = {"vr": vr}
            continue
        kind = _KIND.get(vr)
        if kind is None:
            raise _Unsupported  # SQ, AT, OB, OW, UN, ...
        if kind == "number":
            code = _INTS.get(vr) or _FLOATS[vr]
            size = struct.calcsize(code)
            count = len(raw) // size
            order = "<" if little_endian else ">"
            out[key] = {"vr": vr, "Value": list(struct.unpack(f"{order}{count}{code}", raw[:count * size]))}
            continue
        text = raw.decode(encoding, "replace") if vr in _SPECIFIC else raw.decode("ascii")
        if kind == "single":
            out[key] = {"vr": vr, "Value": [text.rstrip(" \0") or None]}
            continue
        values = [text.strip(" \0")] if "\\" not in text else [v.strip(" \0") for v in text.split("\\")]
        if kind == "pn":
            out[key] = {"vr": vr, "Value": [_person(v) for v in values]}
        elif kind == "is":
            out[key] = {"vr": vr, "Value": [int(v) if v else None for v in values]}
        elif kind == "ds":
            out[key] = {"vr": vr, "Value": [_ds(v) if v else None for v in values]}
        else:
            out[key] = {"vr": vr, "Value": [v if v else None for v in values]}
    return out


def _person(value: str) -> dict[str, str]:
    groups = value.split("=")
    names = ("Alphabetic", "Ideographic", "Phonetic")
    return {names[i]: group for i, group in enumerate(groups[:3]) if group}


def _ds(value: str) -> float | int:
    number = float(value)
    return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
