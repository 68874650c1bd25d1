"""The real gateway as a process: `twistd -n mailgate --config FILE` in a temp dir."""

from __future__ import annotations

import contextlib
import email
import email.message
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from typing import Any

from tests.integration.peers import free_port

# what a user types: the twistd beside this Python
TWISTD = [
    sys.executable,
    "-c",
    "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# mail for every domain lands in <directory>/mail/<domain>/<local>/ (see maildir_messages)
MAILDIR_ROUTE = ("*", "maildir:{directory}/mail/{domain}/{local}/")


def gateway_config(
    directory: str,
    port: int,
    *,
    user: str = "",
    workers: int | None = None,
    smtp: str = "",
    role: str = "inbound",
    credentials_file: str | None = None,
    domains: Sequence[str] = ("example.com",),
    networks: Sequence[str] = ("127.0.0.1/32",),
    route: tuple[str, str] | None = MAILDIR_ROUTE,
    queue_scan_interval: str | None = "1s",
    delivery: str = "",
    nameserver: str | None = None,
    extra: str = "",
) -> str:
    """The config of a test gateway: state in `directory`, one listener on 127.0.0.1:`port`.

    `workers` and `smtp` (more lines) fill [smtp]; `credentials_file` makes an [auth] table;
    `route` is (match, transport), `{directory}` in the transport replaced, or None for no route;
    `queue_scan_interval` (None: the default) and `delivery` (more lines) fill [delivery];
    `nameserver` ("127.0.0.1:port", a test's DNS server) makes a [dns] table with a 3 s timeout;
    `extra` is TOML appended at the end ([filters], more routes).
    """
    lines = [
        "[gateway]",
        'hostname = "gw.test"',
        f'state_dir = "{directory}/state"',
        f"user = {json.dumps(user)}",
    ]
    if workers is not None or smtp:
        lines.append("[smtp]")
        if workers is not None:
            lines.append(f"workers = {workers}")
        lines.extend(textwrap.dedent(smtp).strip().splitlines())
    lines += [
        "[[smtp.listeners]]",
        f'endpoint = "tcp:{port}:interface=127.0.0.1"',
        f"role = {json.dumps(role)}",
    ]
    if credentials_file is not None:
        lines += ["[auth]", f"credentials_file = {json.dumps(credentials_file)}"]
    lines += ["[relay]", f"domains = {json.dumps(list(domains))}", f"networks = {json.dumps(list(networks))}"]
    if route is not None:
        match, transport = route
        transport = transport.replace("{directory}", directory)
        lines += ["[[routes]]", f"match = {json.dumps(match)}", f"transport = {json.dumps(transport)}"]
    if queue_scan_interval is not None or delivery:
        lines.append("[delivery]")
        if queue_scan_interval is not None:
            lines.append(f"queue_scan_interval = {json.dumps(queue_scan_interval)}")
        lines.extend(textwrap.dedent(delivery).strip().splitlines())
    if nameserver is not None:
        lines += ["[dns]", f"nameservers = {json.dumps([nameserver])}", 'timeout = "3s"']
    return "\n".join(lines) + "\n" + textwrap.dedent(extra).strip() + "\n"


class GatewayProcess:
    """Starts, kills and restarts a gateway; runs mailgatectl against it."""

    def __init__(self, directory: str, config_text: str, smtp_port: int, host: str = "127.0.0.1") -> None:
        self.directory = directory
        self.host = host
        self.smtp_port = smtp_port
        self.config_path = os.path.join(directory, "mailgate.toml")
        self.log_path = os.path.join(directory, "mailgate.log")
        with open(self.config_path, "w", encoding="utf-8") as handle:
            handle.write(textwrap.dedent(config_text))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def start(self, timeout: float = 20.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(
            [
                *TWISTD,
                "-n",
                "--pidfile=",
                "mailgate",
                "--config",
                self.config_path,
            ],
            cwd=self.directory,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited with {self.process.returncode}:\n{self.log()}")
            try:
                with socket.create_connection((self.host, self.smtp_port), timeout=1) as conn:
                    if conn.recv(100).startswith(b"220"):
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"the gateway did not answer on {self.host}:{self.smtp_port}:\n{self.log()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def worker_pids(self) -> dict[int, int]:
        """The SMTP worker processes (``smtp.workers``), pid by index: the twistd
        process's children that run ``gateway.smtp.workers --index N``."""
        assert self.process is not None
        found = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as handle:
                    parent = int(handle.read().rsplit(b")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    argv = handle.read().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            if parent == self.process.pid and b"gateway.smtp.workers" in argv:
                found[int(argv[argv.index(b"--index") + 1])] = int(entry)
        return found

    @contextlib.contextmanager
    def only_worker(self, index: int) -> Iterator[None]:
        """Connections made (and greeted) inside go to SMTP worker ``index``.

        The workers share the listening socket and the kernel hands each connection to
        whichever is first to accept: often the same one many times over. The other
        workers are stopped (SIGSTOP) meanwhile and continued on leaving, so read the
        banner inside: a connection is accepted by then."""
        pids = self.worker_pids()
        assert index in pids, f"no SMTP worker {index}: {pids}"
        others = [pid for number, pid in pids.items() if number != index]
        for pid in others:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in others:
                os.kill(pid, signal.SIGCONT)

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as handle:
                return handle.read()
        except OSError:
            return ""

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "--config", self.config_path, *args],
            cwd=self.directory,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"mailgatectl {' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
            )
        return result

    def wait_for_log(self, needle: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            if needle in text:
                return text
            time.sleep(0.1)
        raise AssertionError(f"{needle!r} never appeared in the gateway log:\n{self.log()[-4000:]}")


@contextlib.contextmanager
def running_gateway(directory: str, **config: Any) -> Iterator[GatewayProcess]:
    """A gateway on a free port with `gateway_config(directory, port, **config)`, stopped on leaving."""
    port = free_port()
    process = GatewayProcess(directory, gateway_config(directory, port, **config), port)
    try:
        process.start()
        yield process
    finally:
        process.stop()


def maildir_messages(path: str) -> list[bytes]:
    found = []
    for sub in ("new", "cur"):
        folder = os.path.join(path, sub)
        if os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                with open(os.path.join(folder, name), "rb") as handle:
                    found.append(handle.read())
    return found


def mail_of(gateway: GatewayProcess, address: str) -> list[email.message.Message]:
    """The messages in `address`'s Maildir (where MAILDIR_ROUTE puts them), parsed."""
    local, domain = address.split("@")
    path = os.path.join(gateway.directory, "mail", domain, local)
    return [email.message_from_bytes(raw) for raw in maildir_messages(path)]


def delivered_message(gateway: GatewayProcess, address: str, message_id: str) -> email.message.Message | None:
    """The message with this Message-Id in `address`'s Maildir, or None if it is not there (yet)."""
    for message in mail_of(gateway, address):
        if message["Message-Id"] == message_id:
            return message
    return None


def wait_until(predicate: object, timeout: float = 20.0, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")


__all__: Sequence[str] = [
    "GatewayProcess",
    "delivered_message",
    "free_port",
    "gateway_config",
    "mail_of",
    "maildir_messages",
    "running_gateway",
    "wait_until",
]
