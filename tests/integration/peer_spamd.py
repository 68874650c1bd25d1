"""spamd as a real peer: SpamAssassin's daemon on a loopback port, with its own site config.

`Spamd` runs ``spamd --listen 127.0.0.1:PORT`` in the foreground, in a fresh directory
holding its site configuration (a copy of the system's *.pre plugin lists and a local.cf
that turns the network tests off and keeps Bayes in the directory), with --allow-tell so
that TELL trains. It never reads /etc/spamassassin's local.cf, and nothing leaves the
machine (no DNS, RBL, Razor or Pyzor checks). Started as root, it runs its children as
`nobody` (spamd will not run them as root), with a home directory of its own.

`pause()` / `resume()` stop and continue the whole process group (a daemon that has hung:
connections are still accepted by the kernel, never answered); `kill()` is kill -9 of
the group, as a crash.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import time

from tests.integration.peers import PeerError, SignalledPeer, _Daemon, _program, _write

SPAMD_USER = "nobody"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

LOCAL_CF = """\
# written by tests/integration/peer_spamd.py: local checks only
dns_available no
skip_rbl_checks 1
use_razor2 0
use_pyzor 0
use_bayes 1
bayes_auto_learn 0
bayes_path {home}/bayes
"""


class Spamd(SignalledPeer):
    """spamd on 127.0.0.1:PORT (`hostport`; the endpoint string is `endpoint`)."""

    kind = "spamd"

    def __init__(self, directory: str | None = None, *, max_children: int = 2) -> None:
        super().__init__(directory)
        self.max_children = max_children
        self.site_dir = os.path.join(self.directory, "site")
        self.home_dir = os.path.join(self.directory, "home")
        self._daemon: _Daemon | None = None

    @property
    def log_path(self) -> str:
        return os.path.join(self.directory, "spamd.log")

    @property
    def endpoint(self) -> str:
        return f"tcp:{self.host}:{self.port}"

    def _start(self, timeout: float) -> None:
        os.makedirs(self.site_dir, exist_ok=True)
        os.makedirs(self.home_dir, exist_ok=True)
        for plugins in glob.glob("/etc/spamassassin/*.pre"):  # which plugins load (Bayes among them)
            shutil.copy(plugins, self.site_dir)
        _write(os.path.join(self.site_dir, "local.cf"), LOCAL_CF.format(home=self.home_dir))
        argv = [
            _program("spamd"),
            "--listen", f"{self.host}:{self.port}",
            "--pidfile", os.path.join(self.directory, "spamd.pid"),
            "--siteconfigpath", self.site_dir,
            "--allow-tell",
            "--max-children", str(self.max_children),
            "--local",  # no network tests
            "--helper-home-dir", self.home_dir,
            "--syslog", "stderr",
        ]  # fmt: skip
        if os.geteuid() == 0:
            entry = pwd.getpwnam(SPAMD_USER)
            os.chown(self.home_dir, entry.pw_uid, entry.pw_gid)
            argv += ["--username", SPAMD_USER]
        self._daemon = _Daemon(argv, self.log_path)
        self._wait_answering(timeout)

    def _wait_answering(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._daemon is None or not self._daemon.running():
                raise PeerError("spamd exited during start-up")
            if self.ping():
                return
            time.sleep(0.1)
        raise TimeoutError(f"spamd on {self.hostport} did not answer PING within {timeout:.0f} s")

    def ping(self) -> bool:
        """A blocking PING (for start-up): True when spamd answers PONG."""
        try:
            with socket.create_connection(self.address, timeout=2.0) as conn:
                conn.sendall(b"PING SPAMC/1.5\r\n\r\n")
                return conn.recv(100).startswith(b"SPAMD/1.5 0 PONG")
        except OSError:
            return False
