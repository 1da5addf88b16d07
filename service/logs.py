"""Log set-up: text for people, or one JSON object per line for log pipelines (``log_format``).

Records go through a bounded queue to one writer thread, which formats them and writes what has
queued in one write: the event loop never blocks on a slow log consumer (a full pipe would stall
every request), and if the consumer stops reading, new records are dropped and counted instead of
piling up in memory. Access lines carry their fields (request id, method, path, status, latency,
model, version) as record attributes, so the JSON form has them as keys rather than in a message.
"""

from __future__ import annotations

import atexit
import logging
import queue
import sys
import threading
import time
from datetime import UTC, datetime
from typing import TextIO

import orjson

from service.request_context import RequestInfo

ACCESS_FIELDS = ("request_id", "method", "path", "status", "latency_ms", "model", "version")
access = logging.getLogger("sampserve.access")
QUEUE_RECORDS = 10_000
WRITE_EVERY_S = 0.05


def log_access(info: RequestInfo, method: str, path: str, status: int | str, start: float) -> None:
    """The access line of one request (REST or gRPC), its fields as record attributes; client-chosen
    strings are cut to a bounded length."""
    latency = (time.perf_counter() - start) * 1000
    path = path if len(path) <= 200 else path[:200] + "..."
    access.info("%s %s %s %s %.1fms", info.id, method, path, status, latency,
                extra={"request_id": info.id, "method": method, "path": path, "status": status,
                       "latency_ms": round(latency, 2), "model": info.model[:64], "version": info.version[:16]})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        entry.update({key: getattr(record, key) for key in ACCESS_FIELDS if hasattr(record, key)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


class QueuedHandler(logging.Handler):
    """Puts records on a bounded queue (dropping, counted, when it is full); a writer thread formats
    and writes them, all that has queued in one write. No copy of the record on the request path."""

    def __init__(self, stream: TextIO, formatter: logging.Formatter) -> None:
        super().__init__()
        self.stream, self.lines = stream, formatter
        self.records: queue.Queue[logging.LogRecord | None] = queue.Queue(QUEUE_RECORDS)
        self.dropped = 0
        self._writer = threading.Thread(target=self._write, name="log-writer", daemon=True)
        self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and not record.exc_text:
            record.exc_text = self.lines.formatException(record.exc_info)  # the traceback is gone later
        try:
            self.records.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def _write(self) -> None:
        while (record := self.records.get()) is not None:
            # gather for a moment: one wake-up per batch, not per record, keeps this thread from
            # contending for the interpreter lock with the servers on every request
            time.sleep(WRITE_EVERY_S)
            batch = [record]
            while len(batch) < QUEUE_RECORDS:
                try:
                    more = self.records.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._flush(batch)
                    return
                batch.append(more)
            self._flush(batch)

    def _flush(self, batch: list[logging.LogRecord]) -> None:
        lines = []
        for record in batch:
            try:
                lines.append(self.lines.format(record))
            except Exception:  # a record that cannot be formatted is skipped, never kills the writer
                self.dropped += 1
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            self.dropped += len(lines)

    def close(self) -> None:
        """Write what is queued, then stop (at a normal exit)."""
        try:
            self.records.put(None, timeout=1)
            self._writer.join(timeout=5)
        except queue.Full:
            pass
        super().close()


def configure(log_format: str) -> None:
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = QueuedHandler(sys.stderr, formatter)
    atexit.register(handler.close)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
