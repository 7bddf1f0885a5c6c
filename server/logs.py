"""Structured logs: one JSON object per line, with the request id when there is one.

At info level chinwag logs requests (method, path, status, duration, user id)
and lifecycle events; never a message body, a password, a token or a secret.

A log call only queues its record: the JSON is made and written by one
thread of the process's own (:func:`configure`), so the event loop never
formats a line or blocks on a slow stderr (a pipe nobody reads fast enough).
The queue is flushed when the process exits normally.
"""

from __future__ import annotations

import atexit
import copy
import json
import logging
import logging.handlers
import queue
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:  # made where it was logged (see _Enqueue)
            out["exception"] = record.exc_text
        return json.dumps(out, default=str)


class _Enqueue(logging.handlers.QueueHandler):
    """Queues a copy of the record with what can't wait: the message with its
    arguments and the traceback are made here, while they still describe the
    moment of the call; the JSON is left to the writer thread."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = copy.copy(record)
        record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
            record.exc_info = None
        return record


_TRACEBACKS = logging.Formatter()
_listener: logging.handlers.QueueListener | None = None


@atexit.register
def _stop() -> None:
    """Write out what is queued and end the writer thread."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None


def flush() -> None:
    """Write out what is queued now (before a line printed to stderr, say)."""
    if _listener is not None:
        _listener.stop()
        _listener.start()


def configure(level: int = logging.INFO) -> None:
    """JSON lines on stderr, written by a thread of their own (see above).

    A record keeps no caller, thread or process (the lines never show them):
    finding the caller walks the stack on every call, and the three together
    were half of a log call's cost on the loop (the logging HOWTO's
    "Optimization" section names these switches).
    """
    global _listener
    _stop()
    logging._srcfile = None  # no findCaller per record
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _listener = logging.handlers.QueueListener(records, handler)
    _listener.start()
    root = logging.getLogger()
    root.handlers[:] = [_Enqueue(records)]
    root.setLevel(level)
