"""Log set-up: text for people, or one JSON object per line for log pipelines (``log_format``).

Records go through a bounded queue to a writer thread: the event loop never blocks on a slow log
consumer (a full pipe would otherwise stall every request), and if the consumer stops reading, new
records are dropped and counted instead of piling up in memory. Access lines carry their fields
(request id, method, path, status, latency, model, version) as record attributes, so the JSON form
has them as keys rather than inside a message.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys
from datetime import UTC, datetime

import orjson

ACCESS_FIELDS = ("request_id", "method", "path", "status", "latency_ms", "model", "version")
QUEUE_RECORDS = 10_000


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        entry.update({key: getattr(record, key) for key in ACCESS_FIELDS if hasattr(record, key)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


class DroppingQueueHandler(logging.handlers.QueueHandler):
    """Hands records to the writer thread; drops them (counted) when its queue is full."""

    dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            DroppingQueueHandler.dropped += 1


def configure(log_format: str) -> None:
    writer = logging.StreamHandler(sys.stderr)
    writer.setFormatter(JsonFormatter() if log_format == "json" else
                        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    records: queue.Queue[logging.LogRecord] = queue.Queue(QUEUE_RECORDS)
    listener = logging.handlers.QueueListener(records, writer)
    listener.start()
    atexit.register(listener.stop)  # flushes what is queued at a normal exit
    root = logging.getLogger()
    root.handlers[:] = [DroppingQueueHandler(records)]
    root.setLevel(logging.INFO)
