"""A throwaway, loopback-only Postfix relay instance for the relay benchmark.

The instance lives entirely under one directory (configuration, queue, data,
log) and is started with ``postfix -c DIR``; the system's Postfix in
/etc/postfix is neither read for settings nor started. It differs from the
Postfix defaults only where a benchmark on 127.0.0.1 needs it (the same set-up
as docs/perf-anchors §2 and §8):

- relay everything to ``[127.0.0.1]:SINK`` (numeric relayhost, DNS off,
  no reverse lookups: the machine's resolver is not on loopback);
- ``mynetworks = 127.0.0.0/8``, no local delivery, no chroot;
- logging to a file through postlogd (no syslogd runs here);
- ``default_process_limit`` (250 by default, so that 200 sessions fit: it also
  sets the listen backlog of the smtpd socket; the stock 100 makes
  smtp-source at 200 sessions measure SYN retransmits, see perf-anchors §2.2).

Queue files are fsynced by cleanup before smtpd answers 250 (Postfix's
default), so Postfix runs with its durability on.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time

MAIN_CF = """\
compatibility_level = 3.6
biff = no
queue_directory = {root}/queue
data_directory = {root}/data
maillog_file = {root}/log/maillog
maillog_file_prefixes = {root}/log
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = relay.bench.test
mydomain = bench.test
myorigin = $myhostname
mydestination =
local_recipient_maps =
local_transport = error:5.1.1 local delivery disabled
alias_maps =
alias_database =
relay_domains =
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{sink_port}
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions = permit_mynetworks, reject
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
smtp_host_lookup = native
default_process_limit = {process_limit}
"""

# Only the services a relay uses; chroot off everywhere (the instance's paths
# are outside any chroot).
MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
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

QUEUE_DIRS = ("incoming", "active", "deferred", "hold", "maildrop", "corrupt")


class PostfixError(Exception):
    pass


class PostfixInstance:
    """One Postfix instance under `root`, listening on 127.0.0.1:`port`."""

    def __init__(self, root: str, port: int = 2525, sink_port: int = 2526, process_limit: int = 250) -> None:
        self.root = os.path.abspath(root)
        self.port = port
        self.sink_port = sink_port
        self.process_limit = process_limit
        self.etc = os.path.join(self.root, "etc")
        self.queue = os.path.join(self.root, "queue")
        self.log = os.path.join(self.root, "log", "maillog")
        self.started = False

    # -- set-up ------------------------------------------------------------------

    def create(self) -> None:
        for sub in ("etc", "queue", "data", "log"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        values = {
            "root": self.root,
            "port": self.port,
            "sink_port": self.sink_port,
            "process_limit": self.process_limit,
        }
        with open(os.path.join(self.etc, "main.cf"), "w") as f:
            f.write(MAIN_CF.format(**values))
        with open(os.path.join(self.etc, "master.cf"), "w") as f:
            f.write(MASTER_CF.format(**values))
        shutil.chown(os.path.join(self.root, "data"), "postfix", "postfix")
        # `postfix check` creates the queue's sub-directories with their owners and modes.
        self._postfix("check")

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["postfix", "-c", self.etc, *args], capture_output=True, text=True, timeout=60
        )
        if check and result.returncode != 0:
            raise PostfixError(f"postfix {' '.join(args)}: exit {result.returncode}: {result.stderr.strip()}")
        return result

    # -- running -----------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> None:
        self._postfix("start")
        self.started = True
        deadline = time.monotonic() + timeout
        import socket

        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    if s.recv(512).startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise PostfixError(f"postfix did not answer on 127.0.0.1:{self.port} within {timeout:.0f} s")

    def master_pid(self) -> int | None:
        try:
            with open(os.path.join(self.queue, "pid", "master.pid")) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return None
        return pid if os.path.exists(f"/proc/{pid}") else None

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the instance; escalate to SIGKILL of its master if it does not go."""
        if not self.started:
            return
        pid = self.master_pid()
        self._postfix("stop", check=False)
        deadline = time.monotonic() + timeout
        while pid is not None and os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid is not None and os.path.exists(f"/proc/{pid}"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.started = False

    def queue_count(self) -> int:
        """Messages in the queue (files under the queue directories)."""
        count = 0
        for name in QUEUE_DIRS:
            for _top, _dirs, files in os.walk(os.path.join(self.queue, name)):
                count += len(files)
        return count

    def log_counts(self) -> dict[str, int]:
        counts = {"sent": 0, "deferred": 0, "bounced": 0}
        try:
            with open(self.log, errors="replace") as f:
                for line in f:
                    for status in counts:
                        if f"status={status}" in line:
                            counts[status] += 1
        except OSError:
            pass
        return counts
