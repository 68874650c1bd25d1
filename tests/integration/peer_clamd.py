"""clamd as a real peer: ClamAV's daemon on a loopback port and a UNIX socket, with a test database.

There is no Internet here (and freshclam's database is large), so the signature database
is built at start, in the peer's directory:

- ``test.hdb``: the MD5 of the EICAR test file, made by ``sigtool --md5`` from the EICAR
  string written at test time, renamed ``Eicar-Test-Signature`` (clamd reports it as
  ``Eicar-Test-Signature.UNOFFICIAL``: a signature of our own, not ClamAV's);
- ``test.ndb``: a body signature, `MARKER` anywhere in any file, ``Mailgate-Test-Marker``.

`Clamd` writes a clamd.conf (Foreground, TCPAddr 127.0.0.1, TCPSocket PORT, LocalSocket
in the directory, StreamMaxLength as given) and never reads /etc/clamav. `pause()`,
`resume()` and `kill()` as for spamd (peer_spamd.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time

from tests.integration.peers import PeerError, SignalledPeer, _Daemon, _program, _write

# The EICAR test file (https://www.eicar.org/download-anti-malware-testfile/), 68 bytes.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_NAME = "Eicar-Test-Signature.UNOFFICIAL"
MARKER = b"MAILGATE-TEST-VIRUS-MARKER-7f3a9c"
MARKER_NAME = "Mailgate-Test-Marker.UNOFFICIAL"

CLAMD_CONF = """\
# written by tests/integration/peer_clamd.py
Foreground yes
LogFile {directory}/clamd.log
LogTime yes
PidFile {directory}/clamd.pid
DatabaseDirectory {directory}/db
TCPAddr {host}
TCPSocket {port}
LocalSocket {directory}/clamd.sock
LocalSocketMode 666
StreamMaxLength {stream_max_length}
MaxThreads 4
SelfCheck 3600
"""


def build_database(directory: str) -> None:
    """test.hdb (EICAR by sigtool) and test.ndb (MARKER) in `directory`."""
    os.makedirs(directory, exist_ok=True)
    sample = os.path.join(os.path.dirname(directory), "eicar.com")  # not in the database directory
    with open(sample, "wb") as handle:
        handle.write(EICAR)
    made = subprocess.run(
        [_program("sigtool"), "--md5", sample], capture_output=True, text=True, check=False, timeout=60
    )
    fields = made.stdout.strip().split(":")
    if made.returncode != 0 or len(fields) != 3 or fields[1] != str(len(EICAR)):
        raise PeerError(f"sigtool --md5 failed ({made.returncode}): {made.stdout}{made.stderr}")
    _write(os.path.join(directory, "test.hdb"), f"{fields[0]}:{fields[1]}:Eicar-Test-Signature\n")
    _write(os.path.join(directory, "test.ndb"), f"Mailgate-Test-Marker:0:*:{MARKER.hex()}\n")


class Clamd(SignalledPeer):
    """clamd on 127.0.0.1:PORT and on `socket_path`, with the test database."""

    kind = "clamd"

    def __init__(self, directory: str | None = None, *, stream_max_length: str = "1M") -> None:
        super().__init__(directory)
        self.stream_max_length = stream_max_length
        self._daemon: _Daemon | None = None

    @property
    def log_path(self) -> str:
        return os.path.join(self.directory, "clamd.log")

    @property
    def socket_path(self) -> str:
        return os.path.join(self.directory, "clamd.sock")

    @property
    def tcp_endpoint(self) -> str:
        return f"tcp:{self.host}:{self.port}"

    @property
    def unix_endpoint(self) -> str:
        return f"unix:{self.socket_path}"

    def _start(self, timeout: float) -> None:
        build_database(os.path.join(self.directory, "db"))
        config = os.path.join(self.directory, "clamd.conf")
        _write(
            config,
            CLAMD_CONF.format(
                directory=self.directory,
                host=self.host,
                port=self.port,
                stream_max_length=self.stream_max_length,
            ),
        )
        self._daemon = _Daemon([_program("clamd"), "--config-file", config], self.log_path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._daemon.running():
                raise PeerError("clamd exited during start-up")
            if self.ping():
                return
            time.sleep(0.05)
        raise TimeoutError(f"clamd on {self.hostport} did not answer PING within {timeout:.0f} s")

    def ping(self) -> bool:
        """A blocking PING on both sockets: True when clamd answers PONG on each."""
        try:
            with socket.create_connection(self.address, timeout=2.0) as conn:
                conn.sendall(b"zPING\0")
                if conn.recv(10) != b"PONG\0":
                    return False
            with socket.socket(socket.AF_UNIX) as local:
                local.settimeout(2.0)
                local.connect(self.socket_path)
                local.sendall(b"zPING\0")
                return local.recv(10) == b"PONG\0"
        except OSError:
            return False
