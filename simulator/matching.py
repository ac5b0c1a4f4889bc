"""DICOM attribute matching for C-FIND (PS3.4 C.2.2.2), as a PACS applies it to its records.

A query key is compiled once into a ``Matcher`` (wildcards become one regex, ranges two bounds),
then applied to every record: a query over thousands of records must not re-parse its keys.
Record values are tuples of strings, one item per value, so multi-valued attributes such as
ModalitiesInStudy match when any item matches. ``None`` from ``compile_matcher`` is universal
matching: the caller skips the key instead of calling a function that always says yes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

RecordValue = Sequence[str]
Matcher = Callable[[RecordValue], bool]
ItemTest = Callable[[str], bool]

DATE_TIME_VRS = frozenset({"DA", "TM", "DT"})
NUMERIC_VRS = frozenset({"IS", "DS", "US", "UL", "SS", "SL", "UV", "SV", "FL", "FD"})
# VRs on which '*' and '?' are wildcards (C.2.2.2.4); elsewhere they are plain characters.
WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
# Lowest and highest padding for partial times and date-times, so "10" covers 10:00:00-10:59:59.999999.
_TIME_HIGH = "235959"
_DT_LOW, _DT_HIGH = "00000101000000.000000", "99991231235959.999999"


def is_universal(value: str) -> bool:
    """An empty value, or one made only of '*', matches every record, with or without a value."""
    return not value.strip().strip("*")


def _pad_time(text: str, high: bool) -> str:
    """HHMMSS.FFFFFF with missing parts filled low (range start, record) or high (range end)."""
    whole, _, fraction = text.strip().replace(":", "").partition(".")
    if high:
        return f"{whole + _TIME_HIGH[len(whole) : 6]}.{fraction.ljust(6, '9')[:6]}"
    return f"{whole.ljust(6, '0')}.{fraction.ljust(6, '0')[:6]}"


def _pad_datetime(text: str, high: bool) -> str:
    """YYYYMMDDHHMMSS.FFFFFF without a UTC offset; missing parts filled low or high."""
    text = text.strip()
    offset_at = max(text.rfind("+"), text.rfind("-", 4))
    if offset_at >= 4:
        text = text[:offset_at]
    whole, _, fraction = text.partition(".")
    template = _DT_HIGH if high else _DT_LOW
    whole = whole + template[len(whole) : 14]
    fraction = fraction.ljust(6, "9" if high else "0")[:6]
    return f"{whole}.{fraction}"


def _normalise_point(vr: str, text: str, high: bool = False) -> str:
    """A comparable fixed-width string for one DA, TM or DT value."""
    if vr == "DA":
        return text.strip().replace(".", "")  # ACR-NEMA dates wrote YYYY.MM.DD
    if vr == "TM":
        return _pad_time(text, high)
    return _pad_datetime(text, high)


def _range_test(vr: str, item: str) -> ItemTest:
    """Range matching (C.2.2.2.5); a single value is the range from itself to itself."""
    start, sep, end = item.partition("-")
    if not sep:
        end = start
    low = _normalise_point(vr, start) if start.strip() else None
    high = _normalise_point(vr, end, high=True) if end.strip() else None

    def test(value: str) -> bool:
        if not value.strip():
            return False
        point = _normalise_point(vr, value)
        return (low is None or point >= low) and (high is None or point <= high)

    return test


def wildcard_regex(pattern: str, ignore_case: bool = False) -> re.Pattern[str]:
    """'*' is any run of characters, '?' exactly one; everything else literal."""
    body = "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)
    return re.compile(body, re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def _normalise_pn(value: str) -> str:
    """Case-folded, without insignificant trailing components: 'DOE^John^^^' is 'doe^john'."""
    groups = [group.strip().rstrip("^") for group in value.strip().split("=")]
    return "=".join(groups).rstrip("=").casefold()


def _pn_test(item: str) -> ItemTest:
    """PN matching ignores case; a key without '=' also matches a record's alphabetic group alone."""
    key = _normalise_pn(item)
    if "*" in key or "?" in key:
        regex = wildcard_regex(key, ignore_case=True)

        def same(name: str) -> bool:
            return regex.fullmatch(name) is not None

    else:

        def same(name: str) -> bool:
            return name == key

    if "=" in key:
        return lambda value: same(_normalise_pn(value))
    return lambda value: same(_normalise_pn(value)) or (
        "=" in value and same(_normalise_pn(value.split("=")[0]))
    )


def _text_test(vr: str, item: str) -> ItemTest:
    """Single value or wildcard matching of one string item; case-sensitive except PN."""
    if vr == "PN":
        return _pn_test(item)
    wanted = item.strip()
    if vr in WILDCARD_VRS and ("*" in wanted or "?" in wanted):
        regex = wildcard_regex(wanted)
        return lambda value: regex.fullmatch(value.strip()) is not None
    return lambda value: value.strip() == wanted


def _numeric_test(item: str) -> ItemTest:
    """Numbers compare by value, so '05' matches a record holding '5'."""
    try:
        wanted = float(item)
    except ValueError:
        wanted_text = item.strip()
        return lambda value: value.strip() == wanted_text

    def test(value: str) -> bool:
        try:
            return float(value) == wanted
        except ValueError:
            return False

    return test


def _item_test(vr: str, item: str) -> ItemTest:
    if vr in DATE_TIME_VRS:
        return _range_test(vr, item)
    if vr in NUMERIC_VRS:
        return _numeric_test(item)
    return _text_test(vr, item)


def compile_matcher(vr: str, value: str) -> Matcher | None:
    """A predicate over a record's values for one key, or None for universal matching.

    Backslash-separated keys are a list (C.2.2.2.2 for UIDs, C.2.2.2.8 otherwise): the record
    matches when any of its values matches any item. A record without a value matches only
    universal matching.
    """
    if is_universal(value):
        return None
    items = [item for item in value.split("\\") if item.strip()] if vr not in DATE_TIME_VRS else [value]
    if vr == "UI":
        uids = frozenset(item.strip() for item in items)
        return lambda record: any(v.strip() in uids for v in record)
    if any(is_universal(item) for item in items):
        return None
    tests = [_item_test(vr, item) for item in items]
    if len(tests) == 1:
        (single,) = tests
        return lambda record: any(single(v) for v in record)
    return lambda record: any(test(v) for v in record for test in tests)


def matches(vr: str, value: str, record: RecordValue) -> bool:
    """One-off convenience; queries over many records should keep the compiled matcher."""
    matcher = compile_matcher(vr, value)
    return True if matcher is None else matcher(record)
