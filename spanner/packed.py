"""One node's matches packed for the merge: identity key, order and DICOM JSON text per match.

A million DICOM JSON dicts cost seconds to pickle between Ray processes, and more again in the
cyclic garbage collector, which walks every dict and list they hold. Packed keeps one node's answer
in flat lists of strings and integers, which the collector never visits and pickle copies almost
as bytes; the merge decodes only the copies it must merge and the matches of the requested page.
The node actor packs what it received (microseconds per match, beside milliseconds of DIMSE).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from spanner.outcome import DicomJson
from spanner.query import Level

# Tags of spanner.query.IDENTITY_KEYS and ORDER_KEYS, written out so nothing is looked up at import.
_PATIENT_ID = "00100020"
_ISSUER_OF_PATIENT_ID = "00100021"
IDENTITY_TAG: dict[Level, str] = {
    Level.STUDY: "0020000D",
    Level.SERIES: "0020000E",
    Level.IMAGE: "00080018",
}
ORDER_TAGS: dict[Level, tuple[str, str] | None] = {
    Level.PATIENT: None,
    Level.STUDY: ("00080020", "00080030"),
    Level.SERIES: ("00080021", "00080031"),
    Level.IMAGE: ("00080023", "00080033"),
}
# A backslash separates values in DICOM, so it never occurs inside one PatientID or issuer value.
KEY_SEPARATOR = "\\"
# Order of a match without a usable date: after every dated one (dated orders are minus a stamp, <= 0).
UNDATED = 1


@dataclass(frozen=True, slots=True)
class Packed:
    """Parallel lists, one entry per match in the node's answer order."""

    level: Level
    keys: list[str | None]  # identity key; None when the node left it out
    orders: list[int]  # ascending is newest first (``order``)
    exact: bytes  # 1 where both the date and the time have a value: merging cannot change the order
    filled: list[int]  # attributes with a value (``filled``): what most_complete compares
    texts: list[str]  # canonical DICOM JSON (``canonical``)

    def __len__(self) -> int:
        return len(self.texts)


def canonical(ds: DicomJson) -> str:
    """The one JSON text of a dataset: sorted keys, ASCII only, so equal datasets give equal texts."""
    return json.dumps(ds, sort_keys=True, separators=(",", ":"), default=str)


def _first_text(ds: DicomJson, tag: str) -> str | None:
    """The first value of ``tag`` as stripped text, None when absent or empty."""
    try:
        value = ds[tag]["Value"][0]
    except (KeyError, IndexError, TypeError):
        return None
    if value.__class__ is not str:
        if value is None:
            return None
        value = str(value)
    return value.strip() or None


def identity_key(level: Level, ds: DicomJson) -> str | None:
    """The key under which copies of one entity are merged; None when the node left it out."""
    if level == Level.PATIENT:
        patient_id = _first_text(ds, _PATIENT_ID)
        if patient_id is None:
            return None
        return patient_id + KEY_SEPARATOR + (_first_text(ds, _ISSUER_OF_PATIENT_ID) or "")
    return _first_text(ds, IDENTITY_TAG[level])


def _stamp(date: Any, time: Any) -> int | None:
    """Date and time as one comparable integer (YYYYMMDDHHMMSSffffff); None without a usable date."""
    date = str(date).strip().replace(".", "").replace("-", "")  # also ACR-NEMA style 2024.01.31
    if len(date) != 8 or not (date.isascii() and date.isdigit()):
        return None
    stamp = int(date) * 1_000_000_000_000
    if time is None:
        return stamp
    main, _, fraction = str(time).strip().replace(":", "").partition(".")
    if not (main.isascii() and main.isdigit()) or len(main) > 6:
        return stamp
    stamp += int(main.ljust(6, "0")) * 1_000_000
    fraction = fraction[:6]
    if fraction.isascii() and fraction.isdigit():
        stamp += int(fraction.ljust(6, "0"))
    return stamp


def order(tags: tuple[str, str] | None, ds: DicomJson) -> int:
    """Minus the (date, time) stamp, or UNDATED: ascending is newest first, undated last."""
    if tags is None:
        return UNDATED
    try:
        date = ds[tags[0]]["Value"][0]
    except (KeyError, IndexError, TypeError):
        return UNDATED
    try:
        time = ds[tags[1]]["Value"][0]
    except (KeyError, IndexError, TypeError):
        time = None
    # What pydicom writes for an 8-digit DA and a 6-digit TM: the fast path, once per match.
    if (
        date.__class__ is str and len(date) == 8 and date.isdigit() and date.isascii()
        and time.__class__ is str and len(time) == 6 and time.isdigit() and time.isascii()
    ):
        return -int(date + time) * 1_000_000
    stamp = None if date is None else _stamp(date, time)
    return UNDATED if stamp is None else -stamp


def is_empty(attr: Any) -> bool:
    """No value at all: no Value (or only empty items) and no inline or bulk binary data."""
    if not isinstance(attr, dict):
        return True
    values = attr.get("Value")
    if values:
        return all(value is None or value == "" for value in values)
    return "InlineBinary" not in attr and "BulkDataURI" not in attr


def filled(ds: DicomJson) -> int:
    """How many attributes have a value (``is_empty`` inlined: it runs for every match packed)."""
    count = 0
    for attr in ds.values():
        if attr.__class__ is not dict:
            continue
        values = attr.get("Value")
        if values:
            for value in values:
                if value is not None and value != "":
                    count += 1
                    break
        elif "InlineBinary" in attr or "BulkDataURI" in attr:
            count += 1
    return count


def pack(level: Level, matches: list[DicomJson]) -> Packed:
    """Pack one node's answer, in its order; the dicts are only read."""
    level = Level(level)
    tags = ORDER_TAGS[level]
    keys: list[str | None] = []
    orders: list[int] = []
    exact = bytearray()
    counts: list[int] = []
    texts: list[str] = []
    for ds in matches:
        keys.append(identity_key(level, ds))
        orders.append(order(tags, ds))
        exact.append(tags is None or not (is_empty(ds.get(tags[0])) or is_empty(ds.get(tags[1]))))
        counts.append(filled(ds))
        texts.append(canonical(ds))
    return Packed(level, keys, orders, bytes(exact), counts, texts)


def unpack(packed: Packed) -> list[DicomJson]:
    """The datasets again, equal to what was packed."""
    return [json.loads(text) for text in packed.texts]


def select(packed: Packed, indices: list[int]) -> Packed:
    """The matches at ``indices``, in that order (one partition of a node's answer)."""
    return Packed(
        packed.level,
        [packed.keys[i] for i in indices],
        [packed.orders[i] for i in indices],
        bytes(packed.exact[i] for i in indices),
        [packed.filled[i] for i in indices],
        [packed.texts[i] for i in indices],
    )
