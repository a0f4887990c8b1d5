"""The system under test for the call benchmark: the wire emulators and the real service,
each in its own subprocess (own interpreter, own GIL), plus /proc readings of their CPU and
memory.

    with BenchStack(providers, workdir) as stack:
        stack.server.pid, stack.base_url, stack.ws_url, stack.emulator_urls

Must not import: fastapi, sqlalchemy, store, tools, postcall.
Of ours, imports only: nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
ACCOUNT_SID = "AC" + "b" * 32
AUTH_TOKEN = "bench-auth-token"
API_KEY = "bench-api-key"
DEEPGRAM_KEY = "bench-deepgram-key"
PUBLIC_BASE = "https://bench.example.test"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def media_ws_protocol(service_dir: Path) -> str:
    """uvicorn's `--ws` value for the service's own protocol in `service_dir`."""
    if (service_dir / "api" / "media_ws.py").exists():
        return "api.media_ws:MediaStreamProtocol"
    return "media_ws:MediaStreamProtocol"


@dataclass(frozen=True)
class ProcSample:
    """CPU seconds (user+system) and resident memory of one process at one moment."""

    at: float
    cpu_s: float
    rss_bytes: int


def proc_sample(pid: int) -> ProcSample:
    """Read /proc/<pid>/stat (utime, stime) and /proc/<pid>/statm (resident pages)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: fields 14, 15
    resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return ProcSample(time.monotonic(), cpu, resident * PAGE_BYTES)


def pin_process(pid: int, cpus: set[int]) -> int:
    """Restrict every thread of `pid` to `cpus` (sched_setaffinity is per thread on Linux,
    and threads already running keep their own mask). Returns how many threads were set."""
    count = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):  # a thread that has just ended
            os.sched_setaffinity(int(task.name), cpus)
            count += 1
    return count


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(proc: subprocess.Popen[Any] | None, timeout: float = 10.0) -> None:
    """SIGTERM this one process (by pid), then SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


class BenchStack:
    """Starts the emulators, then the service pointed at them; stops both on exit.

    `emulator_config` is the JSON `python -m emulators --config` reads (twilio / deepgram /
    ollama sections). The service runs with uvloop and httptools when `fast_loop`, from
    `service_dir` (default: this checkout; another one to compare a change), with
    `max_concurrent` as its MAX_CONCURRENT_CALLS (0: no cap) and uvicorn's `--ws`
    `ws_protocol` (`websockets-sansio` to run a tree from before `media_ws`; by default the
    tree's own protocol, found where that tree keeps it: `api/media_ws.py`, or the flat
    `media_ws.py` of trees from before the package layout).
    """

    def __init__(
        self,
        emulator_config: dict[str, Any],
        workdir: Path,
        *,
        fast_loop: bool = True,
        log: IO[str] | None = None,
        service_dir: Path | None = None,
        max_concurrent: int = 0,
        ws_protocol: str | None = None,
    ) -> None:
        self.emulator_config = emulator_config
        self.workdir = workdir
        self.fast_loop = fast_loop
        self.log = log
        self.service_dir = service_dir or ROOT
        self.max_concurrent = max_concurrent
        self.ws_protocol = ws_protocol or media_ws_protocol(self.service_dir)
        self.emulators: subprocess.Popen[str] | None = None
        self.server: subprocess.Popen[bytes] | None = None
        self.emulator_urls: dict[str, str] = {}
        self.pinned: dict[str, list[int]] | None = None
        """Set by the bench's --pin: the CPUs of the service and of the other side."""
        self.port = 0
        self.agent: dict[str, Any] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/twilio/media"

    @property
    def signed_media_url(self) -> str:
        """What the service validates signatures against: PUBLIC_BASE_URL as wss://."""
        return PUBLIC_BASE.replace("https://", "wss://") + "/twilio/media"

    def __enter__(self) -> BenchStack:
        try:
            self._start_emulators()
            self._start_server()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        _stop(self.server)
        _stop(self.emulators)

    # --- emulators ------------------------------------------------------------------------

    def _start_emulators(self, timeout: float = 30.0) -> None:
        config = self.workdir / "emulators.json"
        config.write_text(json.dumps(self.emulator_config))
        command = [sys.executable, "-m", "emulators", "--config", str(config)]
        command += ["--account-sid", ACCOUNT_SID, "--auth-token", AUTH_TOKEN]
        command += ["--deepgram-api-key", DEEPGRAM_KEY]
        command += ["--twilio-port", "0", "--deepgram-port", "0", "--ollama-port", "0"]
        self.emulators = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log, text=True
        )
        self.emulator_urls = self._read_ready_line(self.emulators, timeout)

    @staticmethod
    def _read_ready_line(proc: subprocess.Popen[str], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"emulators exited early (code {proc.poll()})")
            if line.startswith("EMULATORS_READY "):
                return dict(json.loads(line.split(" ", 1)[1]))
        raise TimeoutError("emulators did not print EMULATORS_READY")

    # --- service --------------------------------------------------------------------------

    def server_env(self) -> dict[str, str]:
        data = self.workdir / "data"
        return {
            **os.environ,
            "ENVIRONMENT": "development",
            "LOG_LEVEL": "WARNING",
            "DATA_DIR": str(data),
            "DATABASE_URL": f"sqlite+aiosqlite:///{data}/bench.db",
            "CHROMA_PATH": str(data / "chroma"),
            "PUBLIC_BASE_URL": PUBLIC_BASE,
            "API_KEYS": API_KEY,
            "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "TWILIO_API_BASE_URL": self.emulator_urls["twilio"],
            "DEEPGRAM_API_KEY": DEEPGRAM_KEY,
            "DEEPGRAM_BASE_URL": self.emulator_urls["deepgram"],
            "OLLAMA_HOST": self.emulator_urls["ollama"],
            "ALLOW_PRIVATE_URLS": "true",
            "MAX_CONCURRENT_CALLS": str(self.max_concurrent),
        }

    def _start_server(self, timeout: float = 90.0) -> None:
        self.port = free_port()
        command = [sys.executable, "-m", "uvicorn", "main:create_app", "--factory"]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        # as run.sh: audio does not compress; text messages pushed to the call (media_ws)
        command += ["--ws-per-message-deflate", "false", "--ws", self.ws_protocol]
        if self.fast_loop:
            command += ["--loop", "uvloop", "--http", "httptools"]
        self.server = subprocess.Popen(
            command, cwd=self.service_dir, env=self.server_env(), stdout=self.log, stderr=self.log
        )
        self._wait_healthy(timeout)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.server is not None
            if self.server.poll() is not None:
                raise RuntimeError(f"service exited early (code {self.server.returncode})")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("service did not become healthy")

    def server_sample(self) -> ProcSample:
        assert self.server is not None
        return proc_sample(self.server.pid)

    def emulator_sample(self) -> ProcSample:
        assert self.emulators is not None
        return proc_sample(self.emulators.pid)
