"""Real peers for the integration tests, each a program started on a loopback port in its own temp dir.

- `PostfixSink`: a Postfix instance standing in for the internal Exchange; it accepts mail for its
  domains and delivers it into Maildirs under its directory (`messages()`, `wait_for_messages()`).
- `PostfixRelayWithAuth`: a Postfix smart host that relays only for SASL-authenticated clients
  (SASL through a `DovecotAuth` started with it), offers STARTTLS, and forwards to a next hop.
- `SmtpSink`: Postfix's `smtp-sink`, counting and dumping what it receives.
- `NsdServer`: NSD serving test zones given as text.
- `CertificateAuthority`: a throwaway CA issuing server certificates with openssl.
- `swaks()`, `free_port()`, `wait_for_port()`, `require_program()`, `require_root()`.

Every peer binds 127.0.0.1 only, on a port the harness picks, and lives in a fresh directory
(`make_peer_dir`) that `stop()` removes unless MAILGATE_KEEP_PEER_DIRS is set. The system's own
instances (/etc/postfix, /etc/nsd, /etc/dovecot) are never read, started or stopped.

Nothing here imports pytest at module level: the classes work from a script too. Only
`require_program`/`require_root` use pytest to fail (CI set) or skip (CI unset).
"""

from __future__ import annotations

import atexit
import contextlib
import email.message
import email.parser
import email.policy
import os
import pwd
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver

HOST = "127.0.0.1"
# Where the daemons live on Debian; a non-root PATH often lacks the sbin directories.
_EXTRA_PATH = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
# Ports below the kernel's ephemeral range, so an outgoing connection cannot take a port between
# the harness choosing it and the daemon binding it.
_PORT_RANGE = (20000, 32000)
_START_ATTEMPTS = 3
DELIVERY_USER = "nobody"


class PeerError(Exception):
    """A peer could not be set up, started or queried; the message carries its log tail."""


# -- environment policy ------------------------------------------------------------------------


def in_ci() -> bool:
    """True when CI is set (to anything but "", "0", "false", "no")."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def find_program(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *_EXTRA_PATH])
    return shutil.which(name, path=path)


def _unavailable(reason: str) -> None:
    import pytest

    if in_ci():
        pytest.fail(f"{reason} (CI is set, so this is a failure; run .ci/install-test-deps)", pytrace=False)
    pytest.skip(f"{reason} (run .ci/install-test-deps; with CI set this fails instead)")


def require_program(name: str) -> str:
    """The program's full path; otherwise fail the test when CI is set, skip it when not."""
    found = find_program(name)
    if found is None:
        _unavailable(f"required program {name!r} is not installed")
        raise AssertionError("unreachable")  # pytest.skip/fail raise
    return found


def require_root() -> None:
    """Postfix, NSD and Dovecot instances are started as root (they drop privileges themselves)."""
    if os.geteuid() != 0:
        _unavailable("the real-peer integration tests must run as root")


def _program(name: str) -> str:
    found = find_program(name)
    if found is None:
        raise PeerError(f"program {name!r} not found (run .ci/install-test-deps)")
    return found


# -- ports and directories ---------------------------------------------------------------------


def _bindable(port: int, host: str, kind: socket.SocketKind) -> bool:
    with socket.socket(socket.AF_INET, kind) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = HOST, udp: bool = False) -> int:
    """A port on `host` that is free for TCP (and for UDP too when `udp`) right now."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(*_PORT_RANGE)
        if _bindable(port, host, socket.SOCK_STREAM) and (
            not udp or _bindable(port, host, socket.SOCK_DGRAM)
        ):
            return port
    raise PeerError(f"no free port in {_PORT_RANGE} on {host}")


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Wait until a TCP connection to host:port succeeds; TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as error:
            last = error
        time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} did not accept a connection within {timeout:.0f} s ({last})")


def _smtp_banner(host: str, port: int) -> bytes:
    with socket.create_connection((host, port), timeout=2.0) as conn:
        conn.settimeout(2.0)
        banner = b""
        while not banner.endswith(b"\n"):
            chunk = conn.recv(512)
            if not chunk:
                break
            banner += chunk
        with contextlib.suppress(OSError):
            conn.sendall(b"QUIT\r\n")
        return banner


def make_peer_dir(kind: str) -> str:
    """A fresh directory for one peer, traversable by the daemons' unprivileged users.

    Deliberately not pytest's tmp_path: /tmp/pytest-of-root is mode 0700, which `nobody`
    (Maildir delivery, smtp-sink dumps) and `postfix` (the Dovecot auth socket) cannot traverse.
    """
    base = os.environ.get("MAILGATE_PEER_TMPDIR") or tempfile.gettempdir()
    directory = tempfile.mkdtemp(prefix=f"mailgate-{kind}-", dir=base)
    os.chmod(directory, 0o755)
    return directory


def _keep_dirs() -> bool:
    return bool(os.environ.get("MAILGATE_KEEP_PEER_DIRS"))


def _tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])
    except OSError as error:
        return f"(no log: {error})"


def _run(argv: Sequence[str], what: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise PeerError(
            f"{what}: {' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}".rstrip()
        )
    return result


def _write(path: str, text: str, mode: int = 0o644) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(path, mode)


def _delivery_ids() -> tuple[int, int]:
    entry = pwd.getpwnam(DELIVERY_USER)
    return entry.pw_uid, entry.pw_gid


# -- process handling --------------------------------------------------------------------------

_LIVE: list[Peer] = []


def stop_all_peers() -> None:
    """Stop every peer still running (atexit; also handy after an interrupted session)."""
    for peer in list(reversed(_LIVE)):
        with contextlib.suppress(Exception):
            peer.stop()


atexit.register(stop_all_peers)


def _exited(pid: int) -> bool:
    """Has our child `pid` exited? Does not reap it, so its pid (= its process group) stays ours."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


class _Daemon:
    """A foreground daemon we spawned in its own session; stopped with its whole process group."""

    def __init__(self, argv: Sequence[str], log_path: str, stdout_path: str | None = None) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        with contextlib.ExitStack() as files:
            log = files.enter_context(open(log_path, "ab"))
            out = files.enter_context(open(stdout_path, "ab")) if stdout_path else log
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=log,
                start_new_session=True,
                close_fds=True,
            )

    def running(self) -> bool:
        return not _exited(self.process.pid)

    def stop(self, timeout: float = 10.0) -> None:
        pid = self.process.pid
        if self.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while not _exited(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        # The leader is at most a zombie here, so the group id cannot have been reused:
        # sweep whatever is left of the group (workers that ignored SIGTERM, or the leader).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        self.process.wait(timeout=timeout)


class Peer:
    """Common life cycle: a directory, a port, start (with retries on a port race), stop."""

    kind = "peer"
    host = HOST

    def __init__(self, directory: str | None = None) -> None:
        self.directory = os.path.abspath(directory) if directory else make_peer_dir(self.kind)
        self._own_directory = directory is None
        self.port = 0
        self.started = False

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> str:
        raise NotImplementedError

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def start(self, timeout: float = 20.0) -> None:
        if self.started:
            return
        last: Exception | None = None
        for _ in range(_START_ATTEMPTS):
            self.port = self._choose_port()
            _LIVE.append(self)
            try:
                self._start(timeout)
            except (PeerError, TimeoutError, OSError) as error:
                last = error
                self._stop_processes()
                _LIVE.remove(self)
                if not self._port_taken(error):
                    break
                continue
            self.started = True
            return
        raise PeerError(
            f"{self.kind} on {self.hostport} did not start: {last}\n--- log ---\n{self.log_tail()}"
        )

    def stop(self) -> None:
        try:
            self._stop_processes()
        finally:
            self.started = False
            if self in _LIVE:
                _LIVE.remove(self)
            if self._own_directory and not _keep_dirs():
                shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Peer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- for subclasses -------------------------------------------------------------------------

    def _choose_port(self) -> int:
        return free_port(self.host)

    def _start(self, timeout: float) -> None:
        raise NotImplementedError

    def _stop_processes(self) -> None:
        raise NotImplementedError

    def _port_taken(self, error: Exception) -> bool:
        text = f"{error}\n{self.log_tail(80)}"
        return "in use" in text or "EADDRINUSE" in text or "banner" in str(error)


class SignalledPeer(Peer):
    """A peer run as one `_Daemon` (`self._daemon`) that tests may pause, resume or kill -9."""

    _daemon: _Daemon | None = None

    @property
    def pid(self) -> int:
        assert self._daemon is not None, "not started"
        return self._daemon.process.pid

    def pause(self) -> None:
        os.killpg(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        """kill -9 of the daemon and its children; the peer must be started again to be used."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        assert self._daemon is not None
        self._daemon.process.wait(timeout=10)

    def _stop_processes(self) -> None:
        if self._daemon is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._daemon.process.pid, signal.SIGCONT)  # a paused daemon cannot stop
            self._daemon.stop()
            self._daemon = None


# -- TLS ---------------------------------------------------------------------------------------

_CA_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = MailGate integration-test CA {token}
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
"""

_LEAF_EXT = """\
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth,clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = {san}
"""


@dataclass(frozen=True)
class Certificate:
    cert_file: str
    key_file: str
    ca_file: str


class CertificateAuthority:
    """A throwaway CA (EC P-256, 7 days) under `directory`; `issue()` signs server certificates."""

    def __init__(self, directory: str | None = None) -> None:
        self.directory = os.path.abspath(directory) if directory else make_peer_dir("ca")
        self._own_directory = directory is None
        os.makedirs(self.directory, mode=0o755, exist_ok=True)
        self.ca_file = os.path.join(self.directory, "ca.pem")
        self.ca_key = os.path.join(self.directory, "ca.key")
        self._openssl = _program("openssl")
        cnf = os.path.join(self.directory, "ca.cnf")
        _write(cnf, _CA_CNF.format(token=secrets.token_hex(4)))
        _run(
            [self._openssl, "req", "-x509", "-config", cnf, "-extensions", "v3_ca", "-newkey", "ec",
             "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", self.ca_key,
             "-out", self.ca_file, "-days", "7"],
            "creating the test CA",
        )  # fmt: skip

    def issue(
        self, common_name: str, dns_names: Iterable[str] = ("localhost",), ips: Iterable[str] = (HOST,)
    ) -> Certificate:
        """A server certificate for `common_name` (also in the SANs) plus `dns_names` and `ips`."""
        stem = os.path.join(
            self.directory, re.sub(r"[^A-Za-z0-9.-]", "_", common_name) + "-" + secrets.token_hex(3)
        )
        names = [common_name, *[name for name in dns_names if name != common_name]]
        san = ",".join([*(f"DNS:{name}" for name in names), *(f"IP:{ip}" for ip in ips)])
        _write(stem + ".ext", _LEAF_EXT.format(san=san))
        _run(
            [self._openssl, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", stem + ".key", "-out", stem + ".csr", "-subj", f"/CN={common_name}"],
            f"creating a key for {common_name}",
        )  # fmt: skip
        _run(
            [self._openssl, "x509", "-req", "-in", stem + ".csr", "-CA", self.ca_file, "-CAkey", self.ca_key,
             "-set_serial", "0x" + secrets.token_hex(8), "-days", "7", "-extfile", stem + ".ext",
             "-out", stem + ".pem"],
            f"signing the certificate of {common_name}",
        )  # fmt: skip
        os.chmod(stem + ".key", 0o600)
        return Certificate(cert_file=stem + ".pem", key_file=stem + ".key", ca_file=self.ca_file)

    def cleanup(self) -> None:
        if self._own_directory and not _keep_dirs():
            shutil.rmtree(self.directory, ignore_errors=True)


# -- Postfix -----------------------------------------------------------------------------------

_POSTFIX_MAIN_CF = """\
compatibility_level = 3.6
biff = no
queue_directory = {root}/queue
data_directory = {root}/data
maillog_file = {root}/log/maillog
maillog_file_prefixes = {root}/log
inet_interfaces = {host}
inet_protocols = ipv4
myhostname = {hostname}
smtpd_banner = $myhostname ESMTP {banner_token}
mydomain = {mydomain}
myorigin = $myhostname
mydestination =
local_recipient_maps =
local_transport = error:5.1.1 local delivery disabled
alias_maps =
alias_database =
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
smtp_host_lookup = native
append_dot_mydomain = no
delay_warning_time = 0
queue_run_delay = 5s
minimal_backoff_time = 5s
maximal_backoff_time = 10s
smtpd_tls_security_level = {tls_level}
smtpd_tls_cert_file = {cert_file}
smtpd_tls_key_file = {key_file}
smtpd_tls_loglevel = 1
message_size_limit = {message_size_limit}
"""

# chroot "n" everywhere: the instance's paths are not inside any chroot.
_POSTFIX_MASTER_CF = """\
{host}:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class PostfixInstance(Peer):
    """One Postfix instance (`postfix -c DIR/etc`) with its own queue, data dir, log and port."""

    kind = "postfix"
    hostname = "postfix.peers.test"

    def __init__(
        self,
        directory: str | None = None,
        *,
        ca: CertificateAuthority | None = None,
        tls: bool = True,
        message_size_limit: int = 10_240_000,
        extra_main_cf: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(directory)
        self.etc = os.path.join(self.directory, "etc")
        self.queue = os.path.join(self.directory, "queue")
        self.data = os.path.join(self.directory, "data")
        self.tls = tls
        self.message_size_limit = message_size_limit
        self.extra_main_cf = dict(extra_main_cf or {})
        self._banner_token = "peer-" + secrets.token_hex(6)
        self.ca = ca  # None with tls: a CA of its own under <dir>/tls, made at start
        self.certificate: Certificate | None = None

    @property
    def log_path(self) -> str:
        return os.path.join(self.directory, "log", "maillog")

    @property
    def ca_file(self) -> str | None:
        return self.ca.ca_file if self.ca else None

    def _main_cf_extra(self) -> dict[str, str]:
        return {}

    def _master_cf_extra(self) -> str:
        return ""

    def _prepare(self) -> None:
        """Role-specific files (maps, Dovecot) before `postfix check`."""

    def _postfix(
        self, *args: str, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        argv = [_program("postfix"), "-c", self.etc, *args]
        if check:
            return _run(argv, f"postfix {args[0]}", timeout)
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)

    def _write_config(self) -> None:
        for sub in ("etc", "queue", "data", "log"):
            os.makedirs(os.path.join(self.directory, sub), mode=0o755, exist_ok=True)
        os.chmod(self.queue, 0o755)
        shutil.chown(self.data, "postfix", "postfix")
        if self.tls and self.certificate is None:
            if self.ca is None:
                self.ca = CertificateAuthority(os.path.join(self.directory, "tls"))
            self.certificate = self.ca.issue(self.hostname)
        main_cf = _POSTFIX_MAIN_CF.format(
            root=self.directory,
            host=self.host,
            hostname=self.hostname,
            banner_token=self._banner_token,
            mydomain=self.hostname.partition(".")[2] or "peers.test",
            tls_level="may" if self.tls else "none",
            cert_file=self.certificate.cert_file if self.certificate else "",
            key_file=self.certificate.key_file if self.certificate else "",
            message_size_limit=self.message_size_limit,
        )
        settings = {**self._main_cf_extra(), **self.extra_main_cf}
        main_cf += "".join(f"{key} = {value}\n" for key, value in settings.items())
        _write(os.path.join(self.etc, "main.cf"), main_cf)
        master_cf = _POSTFIX_MASTER_CF.format(host=self.host, port=self.port) + self._master_cf_extra()
        _write(os.path.join(self.etc, "master.cf"), master_cf)

    def _start(self, timeout: float) -> None:
        self._write_config()
        self._prepare()
        # Postfix re-reads a main.cf modified less than ~2 s ago, in 300 ms steps, until it is
        # "cold" (dict_load_file_xt): a fresh instance took 1.5 s to start. Age the files instead.
        aged = time.time() - 60
        for name in os.listdir(self.etc):
            os.utime(os.path.join(self.etc, name), (aged, aged))
        # `start` runs `postfix-script check-fatal` (post-install create-missing: the queue's
        # sub-directories with their owners and modes) and check-warn; a separate `postfix check`
        # would only run the same checks again (~2 s).
        self._postfix("start")
        self._wait_for_banner(timeout)

    def _wait_for_banner(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                banner = _smtp_banner(self.host, self.port)
            except OSError as error:
                last = str(error)
            else:
                if self._banner_token.encode() in banner and banner.startswith(b"220"):
                    return
                raise PeerError(f"wrong banner on {self.hostport}: {banner!r} (port taken by someone else?)")
            if self.master_pid() is None:
                raise PeerError(f"postfix master of {self.etc} is not running")
            time.sleep(0.05)
        raise TimeoutError(f"postfix on {self.hostport} did not greet within {timeout:.0f} s ({last})")

    def master_pid(self) -> int | None:
        try:
            with open(os.path.join(self.queue, "pid", "master.pid")) as handle:
                pid = int(handle.read().strip())
        except (OSError, ValueError):
            return None
        return pid if os.path.exists(f"/proc/{pid}") else None

    def _instance_pids(self) -> list[int]:
        """Processes of this instance: Postfix exports MAIL_CONFIG=<our etc> to every daemon."""
        marker = f"MAIL_CONFIG={self.etc}".encode()
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as handle:
                    environ = handle.read().split(b"\0")
            except OSError:
                continue
            if marker in environ:
                pids.append(int(entry))
        return pids

    def _stop_processes(self) -> None:
        """Kill the instance outright: its queue is scratch, and `postfix stop` costs >1 s
        (the master sleeps a second before it exits). `shutdown()` is the graceful way."""
        pid = self.master_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # first, so that it spawns nothing new
        deadline = time.monotonic() + 10
        while (leftovers := self._instance_pids()) and time.monotonic() < deadline:
            for leftover in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(leftover, signal.SIGKILL)
            time.sleep(0.02)

    def shutdown(self, timeout: float = 10.0) -> None:
        """`postfix stop`: the graceful stop, for a test that wants the peer to go away mid-test."""
        pid = self.master_pid()
        if pid is None:
            return
        self._postfix("stop", check=False, timeout=30)
        deadline = time.monotonic() + timeout
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop_processes()

    # -- inspection -----------------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as handle:
                return handle.read()
        except OSError:
            return ""

    def queue_count(self) -> int:
        """Messages still in this instance's queue."""
        count = 0
        for name in ("incoming", "active", "deferred", "hold", "maildrop"):
            for _top, _dirs, files in os.walk(os.path.join(self.queue, name)):
                count += len(files)
        return count

    def flush(self) -> None:
        """Retry deferred mail now (`postqueue -f`)."""
        _run([_program("postqueue"), "-c", self.etc, "-f"], "postqueue -f")


@dataclass(frozen=True)
class ReceivedMessage:
    """One delivered message: its file, the Maildir it is in, and the parsed message."""

    path: str
    mailbox: str  # the Maildir, relative to mail/: the recipient domain
    message: email.message.EmailMessage = field(repr=False)

    @property
    def message_id(self) -> str:
        return _strip_angle(str(self.message.get("Message-ID", "")))

    @property
    def envelope_recipient(self) -> str:
        return str(self.message.get("Delivered-To", ""))

    @property
    def envelope_sender(self) -> str:
        return _strip_angle(str(self.message.get("Return-Path", "")))


def _strip_angle(value: str) -> str:
    value = value.strip()
    return value[1:-1] if value.startswith("<") and value.endswith(">") else value


def _parse_file(path: str) -> email.message.EmailMessage:
    with open(path, "rb") as handle:
        parsed = email.parser.BytesParser(policy=email.policy.default).parse(handle)
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


def _wait_until(what: str, check: Callable[[], bool], timeout: float, describe: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not within {timeout:.0f} s\n{describe()}")
        time.sleep(0.05)


class PostfixSink(PostfixInstance):
    """The "internal Exchange": accepts any well-formed local part at its domains into Maildirs.

    Mail for `local@domain` lands in the Maildir `<dir>/mail/<domain>/` (owned by `nobody`); the
    envelope recipient is in the Delivered-To: header that Postfix adds, the sender in Return-Path:.
    Local parts outside [A-Za-z0-9._+=-] (or starting with ".") are refused with 550 5.1.1.
    `reject_recipients` / `defer_recipients` are regular expressions on the whole address
    answered at RCPT with 550 5.1.1 / 450 4.2.0, to test the gateway's failure handling.
    It relays nowhere: any other domain gets 554 5.7.1 Relay access denied.
    """

    kind = "postfix-sink"

    def __init__(
        self,
        directory: str | None = None,
        *,
        domains: Sequence[str] = ("internal.test",),
        hostname: str = "exchange.internal.test",
        reject_recipients: Sequence[str] = (),
        defer_recipients: Sequence[str] = (),
        **kwargs: object,
    ) -> None:
        super().__init__(directory, **kwargs)  # type: ignore[arg-type]
        if not domains:
            raise ValueError("PostfixSink needs at least one domain")
        self.domains = tuple(domain.lower().rstrip(".") for domain in domains)
        self.hostname = hostname
        self.reject_recipients = tuple(reject_recipients)
        self.defer_recipients = tuple(defer_recipients)
        self.mail_dir = os.path.join(self.directory, "mail")

    def _main_cf_extra(self) -> dict[str, str]:
        uid, gid = _delivery_ids()
        restrictions = "reject_unauth_destination"
        if self.reject_recipients or self.defer_recipients:
            restrictions = f"check_recipient_access regexp:{self.etc}/recipient_access, " + restrictions
        return {
            "mynetworks": "127.0.0.0/8",
            "relay_domains": "",
            "relayhost": "",
            "default_transport": "error:5.7.1 this sink relays nowhere",
            "virtual_mailbox_domains": " ".join(self.domains),
            "virtual_mailbox_base": self.mail_dir,
            "virtual_mailbox_maps": f"regexp:{self.etc}/virtual_mailbox",
            "virtual_uid_maps": f"static:{uid}",
            "virtual_gid_maps": f"static:{gid}",
            "virtual_minimum_uid": str(min(uid, 100)),
            "virtual_mailbox_limit": "0",
            "smtpd_relay_restrictions": restrictions,
            "smtpd_recipient_restrictions": "",
        }

    def _master_cf_extra(self) -> str:
        return "virtual   unix  - n n - - virtual\n"

    def _prepare(self) -> None:
        uid, gid = _delivery_ids()
        os.makedirs(self.mail_dir, exist_ok=True)
        os.chown(self.mail_dir, uid, gid)
        lines = []
        for domain in self.domains:
            escaped = re.escape(domain).replace("/", r"\/")
            # One Maildir per domain: Postfix forbids $1 substitution in virtual_mailbox_maps.
            lines.append(f"/^[A-Za-z0-9_+=-][A-Za-z0-9._+=-]*@{escaped}$/ {domain}/")
        _write(os.path.join(self.etc, "virtual_mailbox"), "\n".join(lines) + "\n")
        access = [f"/{pattern}/ 550 5.1.1 rejected by the test sink" for pattern in self.reject_recipients]
        access += [f"/{pattern}/ 450 4.2.0 deferred by the test sink" for pattern in self.defer_recipients]
        if access:
            _write(os.path.join(self.etc, "recipient_access"), "\n".join(access) + "\n")

    def messages(self) -> list[ReceivedMessage]:
        """Every delivered message, oldest first (by Maildir file name)."""
        found: list[tuple[str, str, str]] = []
        for top, _dirs, files in os.walk(self.mail_dir):
            if os.path.basename(top) not in ("new", "cur"):
                continue
            mailbox = os.path.relpath(os.path.dirname(top), self.mail_dir)
            found.extend((name, os.path.join(top, name), mailbox) for name in files)
        found.sort()
        return [ReceivedMessage(path, mailbox, _parse_file(path)) for _name, path, mailbox in found]

    def count(self) -> int:
        return sum(
            len(files)
            for top, _dirs, files in os.walk(self.mail_dir)
            if os.path.basename(top) in ("new", "cur")
        )

    def find(self, message_id: str) -> list[ReceivedMessage]:
        """Delivered copies with this Message-ID (one per recipient mailbox); <> optional."""
        wanted = _strip_angle(message_id)
        return [received for received in self.messages() if received.message_id == wanted]

    def wait_for_messages(self, count: int, timeout: float = 15.0) -> list[ReceivedMessage]:
        """Wait until at least `count` messages have been delivered; return them all."""
        _wait_until(
            f"{count} message(s) at {self.hostport}", lambda: self.count() >= count, timeout, self._report
        )
        return self.messages()

    def wait_for_message_id(
        self, message_id: str, count: int = 1, timeout: float = 15.0
    ) -> list[ReceivedMessage]:
        """Wait until `count` copies of the message with this Message-ID have been delivered."""
        _wait_until(
            f"{count} copy(ies) of <{_strip_angle(message_id)}> at {self.hostport}",
            lambda: len(self.find(message_id)) >= count,
            timeout,
            self._report,
        )
        return self.find(message_id)

    def _report(self) -> str:
        return f"delivered: {self.count()}, queued: {self.queue_count()}\n--- maillog ---\n{self.log_tail()}"


# -- Dovecot (SASL only) -----------------------------------------------------------------------

_DOVECOT_CONF = """\
base_dir = {root}/run
state_dir = {root}/state
instance_name = mailgate-peer-{token}
protocols = none
ssl = no
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
auth_verbose = yes
auth_mechanisms = plain login
# Not the default 2 s per failed AUTH: wrong-password tests would take seconds each.
auth_failure_delay = 0
disable_plaintext_auth = no
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home=/nonexistent
}}
service auth {{
  unix_listener {socket} {{
    mode = 0666
  }}
}}
"""


class DovecotAuth(Peer):
    """A Dovecot that only answers SASL on a Unix socket (`socket_path`), for Postfix's smtpd."""

    kind = "dovecot"

    def __init__(self, directory: str | None = None, *, users: Mapping[str, str] | None = None) -> None:
        super().__init__(directory)
        self.users = dict(users or {"relayuser": "relay-" + secrets.token_hex(6)})
        for user, password in self.users.items():
            if any(char in user + password for char in ":\n\r\0"):
                raise ValueError("user names and passwords may not contain ':' or line breaks")
        self.config_path = os.path.join(self.directory, "dovecot.conf")
        self.socket_path = os.path.join(self.directory, "auth")
        self._daemon: _Daemon | None = None

    @property
    def log_path(self) -> str:
        return os.path.join(self.directory, "dovecot.log")

    def _choose_port(self) -> int:
        return 0  # Unix socket only

    def _port_taken(self, error: Exception) -> bool:
        return False

    def _start(self, timeout: float) -> None:
        uid, gid = _delivery_ids()
        _write(
            self.config_path,
            _DOVECOT_CONF.format(
                root=self.directory, token=secrets.token_hex(4), uid=uid, gid=gid, socket=self.socket_path
            ),
        )
        passwd = "".join(f"{user}:{{PLAIN}}{password}::::::\n" for user, password in self.users.items())
        _write(os.path.join(self.directory, "passwd"), passwd, 0o644)
        for sub in ("run", "state"):
            os.makedirs(os.path.join(self.directory, sub), mode=0o755, exist_ok=True)
        _run([_program("doveconf"), "-c", self.config_path, "-n"], "doveconf (checking dovecot.conf)")
        self._daemon = _Daemon([_program("dovecot"), "-F", "-c", self.config_path], self.log_path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._daemon.running():
                raise PeerError("dovecot exited during start-up")
            if self._handshake():
                return
            time.sleep(0.05)
        raise TimeoutError(f"dovecot auth socket {self.socket_path} not ready within {timeout:.0f} s")

    def _handshake(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(1.0)
                conn.connect(self.socket_path)
                conn.sendall(b"VERSION\t1\t2\nCPID\t%d\n" % os.getpid())
                return conn.recv(4096).startswith(b"VERSION\t1\t")
        except OSError:
            return False

    def _stop_processes(self) -> None:
        if self._daemon is not None:
            self._daemon.stop()
            self._daemon = None


class PostfixRelayWithAuth(PostfixInstance):
    """An upstream smart host: relays only for SASL-authenticated clients, forwards to `next_hop`.

    AUTH (PLAIN, LOGIN via Dovecot) is offered only after STARTTLS when `tls_auth_only`.
    `mynetworks` is a documentation address, so loopback gets no relay permission: unauthenticated
    relaying is refused at RCPT with 554 5.7.1. Everything accepted goes to `[next_hop]:port`.
    """

    kind = "postfix-relay"

    def __init__(
        self,
        next_hop: tuple[str, int],
        directory: str | None = None,
        *,
        users: Mapping[str, str] | None = None,
        hostname: str = "smarthost.upstream.test",
        tls_auth_only: bool = True,
        **kwargs: object,
    ) -> None:
        super().__init__(directory, **kwargs)  # type: ignore[arg-type]
        if next_hop[0] != HOST:
            raise ValueError(f"the relay's next hop must be on {HOST}, not {next_hop[0]}")
        if tls_auth_only and not self.tls:
            raise ValueError("tls_auth_only needs tls=True")
        self.next_hop = next_hop
        self.hostname = hostname
        self.tls_auth_only = tls_auth_only
        self.dovecot = DovecotAuth(os.path.join(self.directory, "dovecot"), users=users)

    @property
    def users(self) -> dict[str, str]:
        return self.dovecot.users

    @property
    def user(self) -> str:
        return next(iter(self.dovecot.users))

    @property
    def password(self) -> str:
        return self.dovecot.users[self.user]

    def _main_cf_extra(self) -> dict[str, str]:
        return {
            "mynetworks": "192.0.2.1/32",  # TEST-NET-1: never loopback, never contacted
            "relay_domains": "",
            "relayhost": f"[{self.next_hop[0]}]:{self.next_hop[1]}",
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": self.dovecot.socket_path,  # absolute: no chroot here
            "smtpd_sasl_security_options": "noanonymous",
            "smtpd_sasl_authenticated_header": "yes",
            "smtpd_tls_auth_only": "yes" if self.tls_auth_only else "no",
            "smtpd_relay_restrictions": "permit_sasl_authenticated, reject_unauth_destination, reject",
            "smtpd_recipient_restrictions": "",
        }

    def _prepare(self) -> None:
        os.makedirs(self.dovecot.directory, mode=0o755, exist_ok=True)
        self.dovecot.start()

    def _stop_processes(self) -> None:
        try:
            super()._stop_processes()
        finally:
            self.dovecot.stop()

    def log_tail(self, lines: int = 40) -> str:
        return f"{super().log_tail(lines)}--- dovecot ---\n{self.dovecot.log_tail(lines // 2)}"


# -- smtp-sink ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SinkMessage:
    """One transaction dumped by smtp-sink: its envelope and the message as received."""

    path: str
    mail_from: str
    rcpt_to: tuple[str, ...]
    helo: str
    message: email.message.EmailMessage = field(repr=False)

    @property
    def message_id(self) -> str:
        return _strip_angle(str(self.message.get("Message-ID", "")))


_SINK_HEADER = re.compile(rb"^(X-Client-Addr|X-Client-Proto|X-Helo-Args|X-Mail-Args|X-Rcpt-Args): ?(.*)$")


class SmtpSink(Peer):
    """Postfix's smtp-sink on 127.0.0.1: accepts (or, with `extra_args`, refuses) everything.

    `count()` is smtp-sink's own counter of completed messages (`-c`); `messages()` parses the
    per-transaction dumps (`-d`). `extra_args` go before the address, e.g. ("-f", "rcpt") to
    reject RCPT hard, ("-q", "data") to defer DATA, ("-w", "5") to stall DATA.
    """

    kind = "smtp-sink"

    def __init__(
        self, directory: str | None = None, *, extra_args: Sequence[str] = (), backlog: int = 1024
    ) -> None:
        super().__init__(directory)
        self.extra_args = tuple(extra_args)
        self.backlog = backlog
        self.dump_dir = os.path.join(self.directory, "dump")
        self.counter_path = os.path.join(self.directory, "counters")
        self._token = "sink-" + secrets.token_hex(6)
        self._daemon: _Daemon | None = None

    @property
    def log_path(self) -> str:
        return os.path.join(self.directory, "smtp-sink.log")

    def _start(self, timeout: float) -> None:
        uid, gid = _delivery_ids()
        os.makedirs(self.dump_dir, exist_ok=True)
        os.chown(self.dump_dir, uid, gid)
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.counter_path)
        argv = [
            _program("smtp-sink"), "-4", "-c", "-u", DELIVERY_USER, "-h", f"{self._token}.peers.test",
            "-d", os.path.join(self.dump_dir, "msg."), *self.extra_args, self.hostport, str(self.backlog),
        ]  # fmt: skip
        self._daemon = _Daemon(argv, self.log_path, stdout_path=self.counter_path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._daemon.running():
                raise PeerError("smtp-sink exited during start-up")
            try:
                banner = _smtp_banner(self.host, self.port)
            except OSError:
                time.sleep(0.05)
                continue
            if self._token.encode() not in banner:
                raise PeerError(f"wrong banner on {self.hostport}: {banner!r}")
            # The probe itself was a session: counters start from here.
            return
        raise TimeoutError(f"smtp-sink on {self.hostport} did not greet within {timeout:.0f} s")

    def _stop_processes(self) -> None:
        if self._daemon is not None:
            self._daemon.stop()
            self._daemon = None

    def counters(self) -> dict[str, int]:
        """smtp-sink's last counter line: sess(ions ended), quit, mesg (messages received)."""
        try:
            with open(self.counter_path, "rb") as handle:
                raw = handle.read()
        except OSError:
            return {"sess": 0, "quit": 0, "mesg": 0}
        lines = [line for line in re.split(rb"[\r\n]", raw) if b"mesg=" in line]
        if not lines:
            return {"sess": 0, "quit": 0, "mesg": 0}
        return {key.decode(): int(value) for key, value in re.findall(rb"(\w+)=(\d+)", lines[-1])}

    def count(self) -> int:
        return self.counters().get("mesg", 0)

    def wait_for_messages(self, count: int, timeout: float = 15.0) -> int:
        _wait_until(
            f"{count} message(s) at smtp-sink {self.hostport}",
            lambda: self.count() >= count,
            timeout,
            lambda: f"counters: {self.counters()}",
        )
        return self.count()

    def messages(self) -> list[SinkMessage]:
        """The dumped transactions, oldest first as far as file mtimes tell (a few ms apart at best)."""
        paths = [os.path.join(self.dump_dir, name) for name in os.listdir(self.dump_dir)]
        paths.sort(key=lambda path: (os.stat(path).st_mtime_ns, path))
        return [self._parse_dump(path) for path in paths]

    def find(self, message_id: str) -> list[SinkMessage]:
        wanted = _strip_angle(message_id)
        return [message for message in self.messages() if message.message_id == wanted]

    @staticmethod
    def _parse_dump(path: str) -> SinkMessage:
        with open(path, "rb") as handle:
            raw = handle.read()
        fields: dict[str, list[str]] = {}
        lines = raw.split(b"\n")
        index = 0
        while index < len(lines):
            match = _SINK_HEADER.match(lines[index].rstrip(b"\r"))
            if not match:
                break
            fields.setdefault(match.group(1).decode(), []).append(match.group(2).decode(errors="replace"))
            index += 1
        # Then smtp-sink's three-line Received: header, then the message as the client sent it.
        if index < len(lines) and lines[index].startswith(b"Received:"):
            index += 1
            while index < len(lines) and lines[index][:1] in (b" ", b"\t"):
                index += 1
        body = b"\n".join(lines[index:])
        parsed = email.parser.BytesParser(policy=email.policy.default).parsebytes(body)
        assert isinstance(parsed, email.message.EmailMessage)

        def address(args: str) -> str:
            return _strip_angle(args.split(" ", 1)[0]) if args.startswith("<") else args.split(" ", 1)[0]

        return SinkMessage(
            path=path,
            mail_from=address(fields.get("X-Mail-Args", [""])[0]),
            rcpt_to=tuple(address(value) for value in fields.get("X-Rcpt-Args", [])),
            helo=fields.get("X-Helo-Args", [""])[0],
            message=parsed,
        )


# -- NSD ---------------------------------------------------------------------------------------

_NSD_CONF = """\
server:
  ip-address: {host}
  port: {port}
  do-ip4: yes
  do-ip6: no
  username: ""
  chroot: ""
  zonesdir: "{root}/zones"
  database: ""
  zonelistfile: "{root}/zone.list"
  xfrdfile: "{root}/xfrd.state"
  xfrdir: "{root}/xfr"
  pidfile: "{root}/nsd.pid"
  logfile: "{root}/nsd.log"
  verbosity: 1
  server-count: 1
  reuseport: no
  hide-version: yes
  identity: "{token}"
remote-control:
  control-enable: no
"""


def make_zone(origin: str, body: str, ttl: int = 300, serial: int = 1) -> str:
    """Zone-file text for `origin`: $ORIGIN, $TTL, a SOA and an NS are added unless `body` has a SOA."""
    origin = origin if origin.endswith(".") else origin + "."
    body = textwrap.dedent(body).strip("\n") + "\n"
    if re.search(r"\bSOA\b", body, re.IGNORECASE):
        return f"$ORIGIN {origin}\n$TTL {ttl}\n{body}"
    return (
        f"$ORIGIN {origin}\n$TTL {ttl}\n"
        f"@ IN SOA ns.peers.invalid. hostmaster.peers.invalid. ({serial} 3600 600 86400 {ttl})\n"
        f"@ IN NS ns.peers.invalid.\n"
        f"{body}"
    )


# A zone for MX tests: a domain with two MX hosts (A and AAAA), one with a single MX, a null MX
# (RFC 7505), one with only an A record (implicit MX), and a CNAME.
DEFAULT_ZONES: dict[str, str] = {
    "example.test.": """
        @           IN MX 10 mx1
        @           IN MX 20 mx2
        mx1         IN A     127.0.0.1
        mx1         IN AAAA  ::1
        mx2         IN A     127.0.0.2
        single      IN MX 10 mx1
        nullmx      IN MX 0  .
        nullmx      IN A     127.0.0.9
        amx         IN A     127.0.0.3
        alias       IN CNAME mx1
    """,
}


class NsdServer(Peer):
    """NSD on 127.0.0.1:PORT (UDP and TCP) serving `zones` ({origin: zone text or body})."""

    kind = "nsd"

    def __init__(self, zones: Mapping[str, str] | None = None, directory: str | None = None) -> None:
        super().__init__(directory)
        given = DEFAULT_ZONES if zones is None else zones
        self.zones = {
            (origin if origin.endswith(".") else origin + ".").lower(): make_zone(origin, text)
            for origin, text in given.items()
        }
        self.config_path = os.path.join(self.directory, "nsd.conf")
        self._token = "nsd-" + secrets.token_hex(6)
        self._daemon: _Daemon | None = None

    @property
    def log_path(self) -> str:
        return os.path.join(self.directory, "nsd.log")

    @property
    def nameserver(self) -> str:
        """ "127.0.0.1:PORT", the form a resolver configuration takes."""
        return self.hostport

    def _choose_port(self) -> int:
        return free_port(self.host, udp=True)

    def _write_config(self) -> None:
        zones_dir = os.path.join(self.directory, "zones")
        os.makedirs(zones_dir, exist_ok=True)
        os.makedirs(os.path.join(self.directory, "xfr"), exist_ok=True)
        conf = _NSD_CONF.format(host=self.host, port=self.port, root=self.directory, token=self._token)
        for origin, text in self.zones.items():
            filename = (origin.rstrip(".") or "root") + ".zone"
            _write(os.path.join(zones_dir, filename), text)
            conf += f'zone:\n  name: "{origin}"\n  zonefile: "{filename}"\n'
            _run(
                [_program("nsd-checkzone"), origin, os.path.join(zones_dir, filename)],
                f"nsd-checkzone {origin}",
            )
        _write(self.config_path, conf)
        _run([_program("nsd-checkconf"), self.config_path], "nsd-checkconf")

    def _start(self, timeout: float) -> None:
        self._write_config()
        self._daemon = _Daemon([_program("nsd"), "-d", "-c", self.config_path], self.log_path)
        deadline = time.monotonic() + timeout
        pending = list(self.zones)
        while pending and time.monotonic() < deadline:
            if not self._daemon.running():
                raise PeerError("nsd exited during start-up")
            query = dns.message.make_query(pending[0], dns.rdatatype.SOA)
            try:
                answer = dns.query.udp(query, self.host, port=self.port, timeout=0.5)
            except (dns.exception.DNSException, OSError):
                time.sleep(0.05)
                continue
            if answer.rcode() == dns.rcode.NOERROR and answer.answer:
                pending.pop(0)
            else:
                time.sleep(0.05)
        if pending:
            raise TimeoutError(
                f"nsd on {self.hostport} did not answer SOA {pending[0]} within {timeout:.0f} s"
            )

    def _stop_processes(self) -> None:
        if self._daemon is not None:
            self._daemon.stop()
            self._daemon = None

    def resolver(self, timeout: float = 2.0) -> dns.resolver.Resolver:
        """A dnspython Resolver that asks only this server (no /etc/resolv.conf)."""
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [self.host]
        resolver.port = self.port
        resolver.timeout = resolver.lifetime = timeout
        return resolver


# -- swaks -------------------------------------------------------------------------------------


class SwaksResult(NamedTuple):
    returncode: int
    transcript: str


def swaks(*args: str, server: tuple[str, int] | str | None = None, timeout: float = 30.0) -> SwaksResult:
    """Run swaks with `args` (plus `--server host:port` when `server` is given).

    Returns (exit code, transcript with stdout and stderr interleaved). swaks exits 0 on success,
    23/24/25 on a refused MAIL/RCPT/DATA, 28 on an AUTH failure, 29 on a TLS failure (see its man page).
    """
    argv = [_program("swaks")]
    if server is not None:
        hostport = server if isinstance(server, str) else f"{server[0]}:{server[1]}"
        argv += ["--server", hostport]
    argv += list(args)
    try:
        result = subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            timeout=timeout, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired as error:
        output = error.output.decode(errors="replace") if error.output else ""
        raise TimeoutError(f"swaks {' '.join(args)} did not finish in {timeout:.0f} s:\n{output}") from None
    return SwaksResult(result.returncode, result.stdout.decode(errors="replace"))
