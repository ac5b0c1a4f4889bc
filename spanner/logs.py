"""Logging set-up shared by every process of ours: one JSON object per line, ready for Fluentd.

Each process (ingress replica, node actor, DICOM front, command line) calls ``configure_logging``
once with its service name; ``SPANNER_LOG_FORMAT=text`` switches to a human format for a terminal.
Nothing here runs at import time, so importing a module never touches the root logger.

Privacy rule: patient names, patient IDs and query filter values never go into a record at INFO or
above. pynetdicom prints whole identifiers at INFO, so its logger is held at WARNING unless the
configured level is DEBUG.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Protocol

EXTRA_KEYS = ("query_id", "node", "event", "elapsed_ms")
"""The usual keys a caller passes with ``extra=``; any other extra key is written too (never "level")."""

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

_MARK = "_spanner_handler"
_CHATTY = ("pynetdicom",)  # log identifiers (patient data) at INFO


class LogSettings(Protocol):
    """What configure_logging reads: Settings and ActorTuning both have these two fields."""

    @property
    def log_format(self) -> str: ...

    @property
    def log_level(self) -> str: ...


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside messages are escaped by json)."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _extras(record):
            doc.setdefault(key, value)
        if record.exc_info:
            doc["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """For a person at a terminal: time, level, service, logger, message, then the extras as k=v."""

    def __init__(self, service: str) -> None:
        super().__init__("%(asctime)s %(levelname)-7s [%(service)s] %(name)s: %(message)s%(extras)s")
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        pairs = [f"{k}={v}" for k, v in _extras(record)]
        record.service = self.service
        record.extras = (" " + " ".join(pairs)) if pairs else ""
        return super().format(record)


def _extras(record: logging.LogRecord) -> list[tuple[str, Any]]:
    """The ``extra=`` fields of a record, usual keys first, in a stable order."""
    found = {
        k: v
        for k, v in record.__dict__.items()
        if k not in _STANDARD and not k.startswith("_") and k not in ("service", "extras") and v is not None
    }
    first = [(k, found.pop(k)) for k in EXTRA_KEYS if k in found]
    return first + sorted(found.items())


def make_formatter(service: str, log_format: str) -> logging.Formatter:
    return TextFormatter(service) if log_format == "text" else JsonFormatter(service)


def configure_logging(service: str, settings: LogSettings) -> None:
    """Install our one handler on the root logger; calling it again replaces it rather than adding one."""
    root = logging.getLogger()
    level = logging.getLevelName(settings.log_level.upper())
    if not isinstance(level, int):
        level = logging.INFO
    handler = next((h for h in root.handlers if getattr(h, _MARK, False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        setattr(handler, _MARK, True)
        root.addHandler(handler)
    handler.setFormatter(make_formatter(service, settings.log_format))
    root.setLevel(level)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.DEBUG if level <= logging.DEBUG else logging.WARNING)


def query_log_fields(
    *,
    query_id: str,
    span: str,
    level: str,
    status: str,
    total: int,
    elapsed_ms: float,
    cache: str,
) -> dict[str, Any]:
    """The ``extra=`` of the one INFO line per spanning query: deliberately no filters, no requester.

    Filters may hold PatientName or PatientID, so the signature takes none: nothing can leak by accident.
    """
    return {
        "event": "query.completed",
        "query_id": query_id,
        "span": span,
        "query_level": level,
        "status": status,
        "total": total,
        "elapsed_ms": elapsed_ms,
        "cache": cache,
    }
