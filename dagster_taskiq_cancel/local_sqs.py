"""Local SQS servers as child processes on 127.0.0.1, for the demo and the tests.

Both speak the real SQS and S3 HTTP APIs, so everything above them runs exactly as against AWS.
moto is the embedded default; ministack is a second, independent implementation the tests also
run against, so that no test passes only because one emulator is lenient. Started and stopped by
their pid only.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from typing_extensions import Self

LOCAL_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# ministack pins a botocore that aioboto3 cannot use, so `make` installs it in its own venv here.
MINISTACK_VENV = Path(sys.prefix) / "ministack"


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """True when a server could listen on ``port`` (connections in TIME_WAIT do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class LocalSqsServer:
    """A running local SQS server; subclasses say how to start it and where it answers."""

    label: ClassVar[str]
    health_path: ClassVar[str]

    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> Sequence[str]:
        """The server's command line, listening on 127.0.0.1:``port``."""
        raise NotImplementedError

    def extra_env(self) -> Mapping[str, str]:
        """Environment the server needs besides the local credentials."""
        return {}

    def start(self, timeout: float = 30.0) -> Self:
        """Start the server and return once its health endpoint answers."""
        if not port_is_free(self.port):
            raise RuntimeError(
                f"port {self.port} on 127.0.0.1 is taken: stop what uses it or pick another port"
            )
        self.process = subprocess.Popen(
            self.command(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **LOCAL_CREDENTIALS, **self.extra_env()},
            start_new_session=True,  # a terminal's Ctrl-C must not stop it before its clients
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.label} exited with code {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}{self.health_path}", timeout=1):
                    return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.label} did not answer on {self.endpoint_url} in {timeout}s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class MotoServer(LocalSqsServer):
    """moto's server, the embedded default."""

    label: ClassVar[str] = "moto server"
    health_path: ClassVar[str] = "/moto-api/"

    def command(self) -> Sequence[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]


@dataclass
class MinistackServer(LocalSqsServer):
    """ministack with only SQS and S3; its long polls check for messages every 100 ms."""

    label: ClassVar[str] = "ministack"
    health_path: ClassVar[str] = "/_ministack/health"

    def command(self) -> Sequence[str]:
        executable = MINISTACK_VENV / "bin" / "ministack"
        if executable.exists():
            return [str(executable)]
        found = shutil.which("ministack")
        if found is None:
            raise RuntimeError(f"ministack not found: `make test` installs it in {executable}")
        return [found]

    def extra_env(self) -> Mapping[str, str]:
        return {"BIND_HOST": "127.0.0.1", "GATEWAY_PORT": str(self.port), "SERVICES": "sqs,s3"}


SERVERS: Mapping[str, type[LocalSqsServer]] = {"moto": MotoServer, "ministack": MinistackServer}
