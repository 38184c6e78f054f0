"""Fixtures that run the real Reflex binary: a fresh data directory, a free port, and
helpers to kill -9 and restart it on the same port and data."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[3]
STARTUP_TIMEOUT_S = 60.0


def reflex_bin() -> str:
    """The binary under test: $REFLEX_BIN, else target/debug/reflex of the repository."""
    path = os.environ.get("REFLEX_BIN") or str(REPO / "target" / "debug" / "reflex")
    if not Path(path).is_file():
        pytest.fail(f"reflex binary not found at {path} (build it or set REFLEX_BIN)")
    return path


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """One `reflex serve` process over `data_dir` on a fixed port, restartable."""

    def __init__(self, data_dir: Path, env: Optional[Dict[str, str]] = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.extra_env = dict(env or {})
        self.proc: Optional[subprocess.Popen[str]] = None

    def start(self) -> "Server":
        """Starts the binary and waits until it announces it is ready."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("REFLEX_")}
        env.update(
            {
                "RUST_LOG": "warn",
                "REFLEX_METRICS__ENABLED": "false",
                # Tests send many events per user quickly: no rate-limit filtering.
                "REFLEX_ENGINE__BOT_FILTER__MAX_EVENTS_PER_USER_PER_SEC": "0",
            }
        )
        env.update(self.extra_env)
        self.proc = subprocess.Popen(
            [reflex_bin(), "serve", "--listen", self.target, "--data-dir", str(self.data_dir)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
        )
        lines: "queue.Queue[Optional[str]]" = queue.Queue()

        def pump(stream) -> None:  # keeps the pipe drained for the process's life
            for line in stream:
                lines.put(line)
            lines.put(None)

        assert self.proc.stdout is not None
        threading.Thread(target=pump, args=(self.proc.stdout,), daemon=True).start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill9()
                pytest.fail(f"reflex did not become ready within {STARTUP_TIMEOUT_S}s")
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                code = self.proc.wait()
                pytest.fail(f"reflex exited with {code} before it was ready")
            if line.startswith("reflex listening on "):
                return self

    def kill9(self) -> None:
        """SIGKILL: no flush, no checkpoint, no goodbye to open streams."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the process hangs, its connections stay open and silent."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM and wait for a clean exit (SIGKILL after 20 s)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # in case it was paused
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


_FIGURES: List[str] = []


@pytest.fixture
def report() -> Callable[[str], None]:
    """Records a measured figure, printed in the run's summary (also under -q)."""
    return _FIGURES.append


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001 - pytest hook
    if _FIGURES:
        terminalreporter.section("reflex client figures (measured, not asserted)")
        for line in _FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator:
    """A factory of started servers (each with its own data dir), all stopped at the end."""
    servers = []

    def make(env: Optional[Dict[str, str]] = None) -> Server:
        data = tmp_path / f"data{len(servers)}"
        data.mkdir()
        server = Server(data, env).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server) -> Server:
    """A started server with default settings."""
    return make_server()
