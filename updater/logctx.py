"""Context on every log line that concerns an update: ``[task=… version=… slot=…]``.

journald keeps lines, not stack frames: an operator grepping a fleet's logs for one task id must
find every line about it, from the downloader's thread and the hooks' output alike. The context is
process-wide (one update runs at a time), set where an update starts and cleared where it ends.
"""

from __future__ import annotations

import logging
import threading

_lock = threading.Lock()
_context: dict[str, str] = {}


def set_context(**fields: str | None) -> None:
    with _lock:
        _context.clear()
        _context.update({k: v for k, v in fields.items() if v})


def clear_context() -> None:
    set_context()


class ContextFilter(logging.Filter):
    """Adds ``%(ctx)s`` to every record: the current context, or nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        with _lock:
            text = " ".join(f"{k}={v}" for k, v in _context.items())
        record.ctx = f"[{text}] " if text else ""
        return True
