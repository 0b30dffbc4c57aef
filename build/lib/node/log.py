"""Structured logging: one JSON object per line, one line per event.

Call sites log an event name as the message and put the details in `extra`:
`log.info("user.created", extra={"user_id": uid})`. Fields whose names look secret are
masked, so a careless `extra` never leaks a password or token into the logs.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime"}
)
_SECRET_MARKERS = ("password", "secret", "token", "authorization", "cookie", "key")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name in _STANDARD_ATTRS or name.startswith("_"):
                continue
            if any(marker in name.lower() for marker in _SECRET_MARKERS):
                value = "***"
            entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def setup_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Route every logger (ours, hypercorn's, the libraries') through one JSON handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("pymongo", "asyncio", "hpack", "aioice", "aiortc"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    for name in ("hypercorn.error", "hypercorn.access", "quart.app", "quart.serving"):
        lib_logger = logging.getLogger(name)
        lib_logger.handlers[:] = []
        lib_logger.propagate = True
