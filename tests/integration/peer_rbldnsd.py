"""rbldnsd as a real peer: DNSBL, DNSWL and RHSBL test zones on a loopback port.

`Rbldnsd` serves zones given as {zone: (dataset type, data text)}, each from its own file in
a fresh directory that rbldnsd chroots into: "ip4set" for IP lists (DNSBL/DNSWL), "dnset" for
domain lists (RHSBL), "generic" for plain A/TXT/MX records (rbldnsd serves no PTR or AAAA:
use peers.NsdServer for those). `update()` rewrites one zone and has rbldnsd reload it;
`queries()` lists the questions it has answered (its query log).

`SilentUdpServer` binds a UDP port and never answers: a name server that has gone quiet.

Like every peer, rbldnsd binds 127.0.0.1 only and runs in the foreground (-n) as `nobody`
(it refuses to run as root), stopped with its process group.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Mapping

import dns.exception
import dns.message
import dns.query
import dns.rcode

from tests.integration.peers import HOST, Peer, PeerError, _Daemon, _program, _write, free_port

RBLDNSD_USER = "nobody"


class Rbldnsd(Peer):
    """rbldnsd on 127.0.0.1:PORT (UDP) serving `zones` ({zone: (type, text)})."""

    kind = "rbldnsd"

    def __init__(
        self,
        zones: Mapping[str, tuple[str, str]],
        directory: str | None = None,
        *,
        ttl: int = 300,
    ) -> None:
        super().__init__(directory)
        if not zones:
            raise PeerError("rbldnsd needs at least one zone")
        self.zones = {zone.rstrip(".").lower(): dataset for zone, dataset in zones.items()}
        self.ttl = ttl
        self._daemon: _Daemon | None = None

    @property
    def log_path(self) -> str:
        return os.path.join(self.directory, "rbldnsd.log")

    @property
    def nameserver(self) -> str:
        """ "127.0.0.1:PORT", as [dns] nameservers takes it."""
        return self.hostport

    @property
    def query_log_path(self) -> str:
        return os.path.join(self.directory, "queries.log")

    def queries(self) -> list[tuple[str, str]]:
        """(name, type) of every question answered so far, in order."""
        try:
            with open(self.query_log_path, errors="replace") as handle:
                lines = handle.read().splitlines()
        except FileNotFoundError:
            return []
        found = []
        for line in lines:
            fields = line.split()  # "<time> <client ip> <name> <type> IN: <rcode>/<n>/<size>"
            if len(fields) >= 4:
                found.append((fields[2].lower(), fields[3]))
        return found

    def _choose_port(self) -> int:
        return free_port(self.host, udp=True)

    def _file(self, zone: str) -> str:
        return zone.replace(".", "_") + ".data"

    def _write_zone(self, zone: str) -> None:
        _, text = self.zones[zone]
        lines = [line.strip() for line in text.strip("\n").splitlines()]
        _write(os.path.join(self.directory, self._file(zone)), "\n".join(lines) + "\n")

    def _start(self, timeout: float) -> None:
        # the query log is opened after the chroot, as `nobody`: it must exist and be writable
        _write(self.query_log_path, "", 0o666)
        specs = []
        for zone, (kind, _) in self.zones.items():
            self._write_zone(zone)
            specs.append(f"{zone}:{kind}:{self._file(zone)}")
        argv = [
            _program("rbldnsd"),
            "-n",  # foreground
            "-u", RBLDNSD_USER,
            "-b", f"{self.host}/{self.port}",
            "-r", self.directory,  # chroot: the data files are named relative to it
            "-t", str(self.ttl),
            "-c", "0",  # no timed reload checks: update() sends SIGHUP
            "-l", "+/queries.log",  # unbuffered, inside the chroot
            *specs,
        ]  # fmt: skip
        self._daemon = _Daemon(argv, self.log_path)
        self._wait_answering(timeout)

    def _wait_answering(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        probe = "startup-probe." + next(iter(self.zones))
        while time.monotonic() < deadline:
            if self._daemon is None or not self._daemon.running():
                raise PeerError("rbldnsd exited during start-up")
            try:
                answer = dns.query.udp(
                    dns.message.make_query(probe, "A"), self.host, port=self.port, timeout=0.5
                )
            except (dns.exception.DNSException, OSError):
                time.sleep(0.05)
                continue
            if answer.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                return
            time.sleep(0.05)
        raise TimeoutError(f"rbldnsd on {self.hostport} did not answer within {timeout:.0f} s")

    def update(self, zone: str, text: str) -> None:
        """Replace a zone's data and make rbldnsd reload it now (SIGHUP), keeping its type."""
        zone = zone.rstrip(".").lower()
        kind, _ = self.zones[zone]
        self.zones[zone] = (kind, text)
        self._write_zone(zone)
        assert self._daemon is not None
        before = os.path.getsize(self.log_path)
        os.kill(self._daemon.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open(self.log_path, errors="replace") as handle:
                handle.seek(before)
                if "reloaded" in handle.read():
                    return
            time.sleep(0.05)
        raise PeerError(f"rbldnsd did not reload {zone}:\n{self.log_tail()}")

    def _stop_processes(self) -> None:
        if self._daemon is not None:
            self._daemon.stop()
            self._daemon = None


class SilentUdpServer:
    """A UDP port on 127.0.0.1 that takes every question and never answers."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind((HOST, 0))
        self.port = int(self.socket.getsockname()[1])

    @property
    def nameserver(self) -> str:
        return f"{HOST}:{self.port}"

    def close(self) -> None:
        self.socket.close()
