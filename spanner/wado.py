"""WADO-RS pieces that need no app: where a spooled instance's values lie in its file, its frames, its
metadata as DICOM JSON with bulk data replaced by URIs, Accept negotiation and multipart framing.

    located = locate(instance, PIXEL_DATA)                # byte ranges of one top-level value in the file
    for chunk in read_ranges(instance.path, ranges): ...  # CHUNK_BYTES at a time, never a whole value
    text = metadata_json(instance)                        # BulkDataURIs start with BASE_PLACEHOLDER

Values are read from the Part-10 file by offset (pydicom's element generator with deferred values gives
the offsets), so pixel data is never held whole in a Python object; only the header above the pixel data
is parsed into a pydicom Dataset, for the metadata.
"""

from __future__ import annotations

import json
import secrets
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.filereader import data_element_generator
from pydicom.tag import Tag

from spanner.dicom_constants import (
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    PIXEL_DATA,
)
from spanner.dimse.store import StoredInstance, convert, convertible, part10_header

CHUNK_BYTES = 512 * 1024
"""Bytes per chunk handed from the store actor to the ingress: small enough to keep memory bounded, big
enough that a round trip per chunk costs little."""
BULK_THRESHOLD = 1024
"""Binary values longer than this are replaced by a BulkDataURI in the metadata."""
BASE_PLACEHOLDER = "{{spanner-wado-base}}"
"""Stands for the front's base URL in cached metadata; replaced when the metadata is sent."""
UNCOMPRESSED = frozenset({EXPLICIT_VR_LE, IMPLICIT_VR_LE})
"""Stored syntaxes whose frames are plain little-endian pixels: the same bytes in both."""
ANY_SYNTAX = "*"
ITEM = 0xFFFEE000
SEQUENCE_DELIMITER = 0xFFFEE0DD


class WadoError(Exception):
    """A WADO-RS request this instance cannot satisfy; ``kind`` says which HTTP status fits."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(kind, message)
        self.kind = kind  # "not_found", "bad_request", "not_acceptable", "not_implemented", "upstream"
        self.message = message


@dataclass(frozen=True, slots=True)
class Located:
    """One top-level element's value in the file: its ranges (one for a plain value; one per fragment
    for encapsulated pixel data) and, when encapsulated, its basic offset table."""

    vr: str
    ranges: tuple[tuple[int, int], ...]
    encapsulated: bool
    offset_table: tuple[int, ...] = ()
    fragment_starts: tuple[int, ...] = ()  # each fragment's item offset from the first fragment item


def _header_elements(f: BinaryIO, instance: StoredInstance, stop: int | None
                     ) -> Iterator[RawDataElement | DataElement]:
    f.seek(instance.offset)
    implicit = instance.transfer_syntax == IMPLICIT_VR_LE
    stop_when: Callable[[Any, str | None, int], bool] | None = None
    if stop is not None:
        stop_at = stop

        def stop_when(tag: Any, vr: str | None, length: int) -> bool:
            return int(tag) > stop_at

    yield from data_element_generator(f, implicit, True, stop_when=stop_when, defer_size=BULK_THRESHOLD)


def locate(instance: StoredInstance, tag: int) -> Located | None:
    """Where the top-level element ``tag`` has its value in the file, or None when it is absent."""
    with instance.path.open("rb") as f:
        for element in _header_elements(f, instance, tag):
            if int(element.tag) != tag:
                continue
            vr = str(element.VR or "UN")
            tell = getattr(element, "value_tell", None)
            length = getattr(element, "length", None)
            if tell is None or length is None:
                return None
            if length != 0xFFFFFFFF:
                return Located(vr, ((int(tell), int(length)),), False)
            return _encapsulated(f, vr, int(tell))
    return None


def _encapsulated(f: BinaryIO, vr: str, start: int) -> Located:
    """Items of encapsulated pixel data: the basic offset table, then one range per fragment."""
    f.seek(start)
    table: tuple[int, ...] = ()
    ranges: list[tuple[int, int]] = []
    starts: list[int] = []
    first_fragment: int | None = None
    while True:
        where = f.tell()
        head = f.read(8)
        if len(head) < 8:
            raise WadoError("not_implemented", "the encapsulated pixel data ends before its delimiter")
        group, element, length = struct.unpack("<HHI", head)
        tag = (group << 16) | element
        if tag == SEQUENCE_DELIMITER:
            break
        if tag != ITEM:
            raise WadoError("not_implemented", f"unexpected tag {tag:08X} in encapsulated pixel data")
        if not table and first_fragment is None and not ranges and where == start:
            table = struct.unpack(f"<{length // 4}I", f.read(length)) if length else ()
            continue
        if first_fragment is None:
            first_fragment = where
        starts.append(where - first_fragment)
        ranges.append((f.tell(), length))
        f.seek(length, 1)
    return Located(vr, tuple(ranges), True, tuple(table), tuple(starts))


def read_ranges(path: Path, ranges: Sequence[tuple[int, int]], chunk: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The bytes of ``ranges`` of the file, at most ``chunk`` at a time."""
    with path.open("rb") as f:
        for offset, length in ranges:
            f.seek(offset)
            left = length
            while left > 0:
                data = f.read(min(chunk, left))
                if not data:
                    raise WadoError("not_found", f"{path.name} is shorter than its header says")
                left -= len(data)
                yield data


def read_file(instance: StoredInstance, chunk: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The whole Part-10 file (``application/dicom``), at most ``chunk`` bytes at a time."""
    return read_ranges(instance.path, [(0, instance.size)], chunk)


def header(instance: StoredInstance) -> pydicom.Dataset:
    """The data set above the pixel data; values longer than BULK_THRESHOLD stay on disk until read."""
    return pydicom.dcmread(instance.path, stop_before_pixels=True, defer_size=BULK_THRESHOLD)


def _int(ds: pydicom.Dataset, keyword: str, default: int) -> int:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def frame_count(ds: pydicom.Dataset) -> int:
    return max(1, _int(ds, "NumberOfFrames", 1))


FrameTable = tuple[tuple[tuple[int, int], ...], ...]
"""Per frame (frame 1 first), the file ranges of its bytes."""


def frame_table(instance: StoredInstance) -> FrameTable:
    """Where every frame of the instance lies in its file; WadoError when it has no frames to cut."""
    pixels = locate(instance, PIXEL_DATA)
    if pixels is None:
        raise WadoError("not_found", f"instance {instance.sop_instance_uid} has no pixel data, so no frames")
    ds = header(instance)
    count = frame_count(ds)
    if not pixels.encapsulated:
        bits = _int(ds, "Rows", 0) * _int(ds, "Columns", 0) * _int(ds, "SamplesPerPixel", 1) \
            * _int(ds, "BitsAllocated", 8)
        size = (bits + 7) // 8
        if bits % 8:
            raise WadoError("not_implemented",
                            "frames of bit-packed pixel data (BitsAllocated 1) are not served")
        offset, length = pixels.ranges[0]
        if size * count > length:
            raise WadoError("not_found", f"the pixel data of {instance.sop_instance_uid} is shorter than "
                            f"{count} frame(s) of {size} bytes")
        return tuple(((offset + n * size, size),) for n in range(count))
    fragments = list(zip(pixels.fragment_starts, pixels.ranges, strict=True))
    if pixels.offset_table:
        bounds = [*pixels.offset_table, 1 << 62]
        return tuple(tuple(r for start, r in fragments if bounds[i] <= start < bounds[i + 1])
                     for i in range(len(pixels.offset_table)))
    if len(fragments) == count:
        return tuple((r,) for _, r in fragments)
    if count == 1:
        return (tuple(r for _, r in fragments),)
    raise WadoError("not_implemented", f"the {len(fragments)} fragments of {instance.sop_instance_uid} "
                    f"cannot be split into its {count} frames (no basic offset table)")


def frame_ranges(table: FrameTable, numbers: Sequence[int], sop_instance_uid: str
                 ) -> list[tuple[tuple[int, int], ...]]:
    """The ranges of each requested frame (1-based, as in the URL)."""
    beyond = [n for n in numbers if n > len(table)]
    if beyond:  # 400, as PS3.18 answers a frame number beyond the instance's frames (8.2.7, 9.5.2)
        raise WadoError("bad_request", f"instance {sop_instance_uid} has {len(table)} frame(s); frame "
                        f"{beyond[0]} does not exist")
    return [table[n - 1] for n in numbers]


def decoded_frame(instance: StoredInstance, number: int) -> bytes:
    """Frame ``number`` (1-based) of a compressed instance, decoded with pydicom to little-endian pixels
    (one frame in memory), for a client that takes only uncompressed frames. A WadoError (406) says why
    when the data will not decode."""
    from pydicom.pixels.utils import pixel_array

    try:
        frame = pixel_array(str(instance.path), index=number - 1)
    except Exception as exc:  # a codec's own error types
        raise WadoError("not_acceptable", f"frame {number} of instance {instance.sop_instance_uid} is stored "
                        f"in {instance.transfer_syntax} and could not be decoded ({exc}); ask for "
                        f"transfer-syntax=* to get it as stored") from exc
    return bytes(frame.astype(frame.dtype.newbyteorder("<"), copy=False).tobytes())


def uncompressed_part10(instance: StoredInstance) -> bytes:
    """The instance as a Part-10 file in Explicit VR Little Endian, decompressed (one instance in memory),
    for a client that takes only that; a WadoError (406) when it cannot be."""
    from spanner.dimse.errors import DimseError

    if not convertible(instance.transfer_syntax):
        raise WadoError("not_acceptable", f"instance {instance.sop_instance_uid} is stored in "
                        f"{instance.transfer_syntax}, which the spanner cannot decode; ask for "
                        f"transfer-syntax=* to get it as stored")
    try:
        dataset = convert(instance, EXPLICIT_VR_LE)
    except DimseError as exc:
        raise WadoError("not_acceptable", exc.message) from exc
    return part10_header(instance.sop_class_uid, instance.sop_instance_uid, EXPLICIT_VR_LE) + dataset


def bulk_ranges(instance: StoredInstance, tag: int) -> tuple[tuple[int, int], ...]:
    """A top-level value's bytes as stored (encapsulated pixel data: its fragments one after another)."""
    located = locate(instance, tag)
    if located is None:
        raise WadoError("not_found", f"instance {instance.sop_instance_uid} has no top-level element "
                        f"{tag:08X}")
    return located.ranges


def metadata_json(instance: StoredInstance, study: str, series: str) -> str:
    """The instance as DICOM JSON text (PS3.18 F.2); binary values longer than BULK_THRESHOLD, and the
    pixel data, are BulkDataURIs under BASE_PLACEHOLDER."""
    ds = header(instance)
    prefix = (f"{BASE_PLACEHOLDER}/studies/{study}/series/{series}/instances/"
              f"{instance.sop_instance_uid}/bulkdata/")

    def uri(element: DataElement) -> str:
        return f"{prefix}{int(element.tag):08X}"

    body: dict[str, Any] = ds.to_json_dict(bulk_data_threshold=BULK_THRESHOLD, bulk_data_element_handler=uri)
    pixels = locate(instance, PIXEL_DATA)
    if pixels is not None:
        # Implicit VR files name no VR: OW for pixels wider than a byte (PS3.5 8.2), else OB.
        vr = pixels.vr if pixels.vr in ("OB", "OW") else ("OW" if _int(ds, "BitsAllocated", 8) > 8 else "OB")
        body[f"{PIXEL_DATA:08X}"] = {"vr": vr,
                    "BulkDataURI": f"{prefix}{PIXEL_DATA:08X}"}
    return json.dumps(body, separators=(",", ":"))


# -- Accept negotiation --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MediaRange:
    media_type: str  # e.g. "multipart/related"
    params: dict[str, str]
    quality: float


def parse_accept(value: str) -> list[MediaRange]:
    """The media ranges of an Accept header, best quality first (order kept among equals)."""
    ranges: list[MediaRange] = []
    for item in _split(value, ","):
        pieces = _split(item, ";")
        if not pieces or not pieces[0].strip():
            continue
        params: dict[str, str] = {}
        for piece in pieces[1:]:
            name, _, raw = piece.partition("=")
            params[name.strip().lower()] = raw.strip().strip('"')
        try:
            quality = float(params.pop("q", "1"))
        except ValueError:
            quality = 1.0
        ranges.append(MediaRange(pieces[0].strip().lower(), params, quality))
    return sorted(ranges, key=lambda r: -r.quality)


def _split(value: str, separator: str) -> list[str]:
    """Split on ``separator`` outside double quotes."""
    out: list[str] = []
    current: list[str] = []
    quoted = False
    for char in value:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            out.append("".join(current))
            current = []
        else:
            current.append(char)
    out.append("".join(current))
    return out


def boundary() -> str:
    """A multipart boundary of 128 random bits: a payload colliding with it is as likely as guessing it."""
    return f"spanner-{secrets.token_hex(16)}"


def part_head(mark: str, content_type: str, location: str | None = None) -> bytes:
    lines = [f"--{mark}", f"Content-Type: {content_type}"]
    if location is not None:
        lines.append(f"Content-Location: {location}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def closing(mark: str) -> bytes:
    return f"--{mark}--\r\n".encode("ascii")


def tag_of(text: str) -> int:
    """A tag from 8 hex digits or a keyword; WadoError (bad request) otherwise."""
    try:
        return int(Tag(int(text, 16) if len(text) == 8 else text))
    except (ValueError, TypeError) as exc:
        raise WadoError("bad_request", f"{text!r} is neither 8 hex digits nor a DICOM keyword") from exc
