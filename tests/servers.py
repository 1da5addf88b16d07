"""The real server as a subprocess on free loopback ports (REST and gRPC), for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

SERVE = (sys.executable, "-m", "sampserve.cli", "serve")


class Server:
    def __init__(self, process: subprocess.Popen, url: str, grpc_target: str, lines: list[str]) -> None:
        self.process, self.url, self.grpc_target = process, url, grpc_target
        self.http = httpx.Client(base_url=url, timeout=30)
        self.lines = lines
        # keep reading the server's output (access log lines): a full pipe would block the server
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:  # type: ignore[union-attr]
            self.lines.append(line)

    def output(self) -> str:
        """Everything the server printed so far (all of it once it has exited)."""
        if self.process.poll() is not None:
            self._reader.join(timeout=10)
        return "".join(self.lines)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, as an orchestrator stops it; the exit code once it has drained."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self.http.close()
            if self.process.poll() is None:
                self.process.kill()


def start_server(repo: Path, *extra: str, command: Sequence[str] = SERVE, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> Server:
    """Start ``command`` serving ``repo`` on free loopback ports; return once it is ready."""
    env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [*command, "--repo", str(repo), "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0",
         "--threads", "1", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    deadline = time.monotonic() + 60
    url = None
    lines = []
    while time.monotonic() < deadline and process.poll() is None:
        line = process.stdout.readline()  # type: ignore[union-attr]
        lines.append(line)
        if "REST on " in line:
            url = line.split("REST on ", 1)[1].split()[0]
            grpc_target = line.split("gRPC on ", 1)[1].split()[0]
            break
    if url is None:
        process.kill()
        raise RuntimeError("server did not start:\n" + "".join(lines))
    server = Server(process, url, grpc_target, lines)
    try:
        while time.monotonic() < deadline:
            if server.http.get("/v2/health/ready").status_code == 200:
                return server
            time.sleep(0.1)
    except httpx.HTTPError:
        process.kill()  # never leave a server behind
        raise
    process.kill()
    raise RuntimeError("server never became ready:\n" + server.output())
