"""A real Dovecot serving POP3 and IMAP mailboxes, for the fetch clients' integration tests.

`DovecotMail` starts Dovecot (`dovecot -F`, as root; it drops to `nobody` for the mail and to
`dovenull` for the login processes) in a fresh directory with four listeners on 127.0.0.1:

- `pop3_port`: POP3 with STLS; `pop3s_port`: POP3 over TLS from the first byte;
- `imap_port`: IMAP with STARTTLS; `imaps_port`: IMAP over TLS.

Users and their plain-text passwords come from `users` (a passwd-file); the mail is in Maildirs
under `<directory>/mail/<user>/` (INBOX at the top, other folders as Maildir++ ".Name"
subdirectories). The certificate is for "localhost" and 127.0.0.1, issued by a throwaway CA
(`ca_file`), so a client checking the name "localhost" accepts it and any other name is refused.

`deliver(user, message)` puts a message into a user's INBOX (or a folder) the way an MDA does
(tmp/, then renamed into new/); `messages(user)` lists what is left, with the Maildir flags
("S" seen, "T" deleted but not yet expunged). `doveadm(...)` runs doveadm on this instance.

Plain-text logins are allowed without TLS (`disable_plaintext_auth = no`) so tests can check
that the client, not the server, refuses to send a password in clear. APOP is enabled.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass

from tests.integration.peers import (
    HOST,
    CertificateAuthority,
    Peer,
    PeerError,
    _Daemon,
    _delivery_ids,
    _program,
    _run,
    _write,
    free_port,
)

_DOVECOT_MAIL_CONF = """\
base_dir = {root}/run
state_dir = {root}/state
instance_name = mailgate-mail-{token}
protocols = pop3 imap
listen = {host}
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
auth_verbose = yes
auth_mechanisms = plain login apop
# Not the default 2 s per failed login: wrong-password tests would take seconds each.
auth_failure_delay = 0
disable_plaintext_auth = no
default_login_user = dovenull
default_internal_user = dovecot
first_valid_uid = 1
mail_location = maildir:{root}/mail/%u
ssl = yes
ssl_cert = <{cert_file}
ssl_key = <{key_file}
ssl_min_protocol = TLSv1.2
pop3_uidl_format = %08Xu%08Xv
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/home/%u
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {host}
    port = {pop3_port}
  }}
  inet_listener pop3s {{
    address = {host}
    port = {pop3s_port}
    ssl = yes
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = {host}
    port = {imap_port}
  }}
  inet_listener imaps {{
    address = {host}
    port = {imaps_port}
    ssl = yes
  }}
}}
"""


@dataclass(frozen=True)
class StoredMessage:
    """One message file in a Maildir: its file name, its flags (sorted letters) and its bytes."""

    name: str
    flags: str
    content: bytes

    @property
    def deleted(self) -> bool:
        return "T" in self.flags

    @property
    def seen(self) -> bool:
        return "S" in self.flags


def imap_utf7(name: str) -> str:
    """A folder name in IMAP's modified UTF-7 (RFC 3501 5.1.3), as Dovecot names Maildir++ folders."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            encoded = base64.b64encode("".join(pending).encode("utf-16-be")).decode("ascii")
            out.append("&" + encoded.rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for char in name:
        if 0x20 <= ord(char) <= 0x7E:
            flush()
            out.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    flush()
    return "".join(out)


class DovecotMail(Peer):
    """Dovecot with POP3 (+STLS), POP3S, IMAP (+STARTTLS) and IMAPS on 127.0.0.1; Maildirs inside."""

    kind = "dovecot-mail"

    def __init__(
        self,
        directory: str | None = None,
        *,
        users: Mapping[str, str] | None = None,
        extra_config: str = "",
    ) -> None:
        super().__init__(directory)
        self.users = dict(
            users
            or {
                "alice": "alice-" + secrets.token_hex(6),
                "bob": "bob-" + secrets.token_hex(6),
                "carol": "carol-" + secrets.token_hex(6),
            }
        )
        for user, password in self.users.items():
            if any(char in user + password for char in ":\n\r\0/") or user.startswith("."):
                raise ValueError("user names and passwords may not contain ':', '/' or line breaks")
        self.extra_config = extra_config
        self.config_path = os.path.join(self.directory, "dovecot.conf")
        self.mail_root = os.path.join(self.directory, "mail")
        self.pop3_port = self.pop3s_port = self.imap_port = self.imaps_port = 0
        self._ca: CertificateAuthority | None = None
        self.ca_file = ""
        self._daemon: _Daemon | None = None
        self._sequence = 0

    @property
    def log_path(self) -> str:
        return os.path.join(self.directory, "dovecot.log")

    def password(self, user: str) -> str:
        return self.users[user]

    # -- mailboxes ----------------------------------------------------------------------------------

    def maildir(self, user: str, folder: str = "INBOX") -> str:
        """The Maildir of `user`'s `folder` (made if missing, owned by the mail user)."""
        if user not in self.users:
            raise KeyError(f"no such test user {user!r} (users: {', '.join(self.users)})")
        base = os.path.join(self.mail_root, user)
        path = base if folder.upper() == "INBOX" else os.path.join(base, "." + imap_utf7(folder))
        uid, gid = _delivery_ids()
        os.makedirs(self.mail_root, mode=0o755, exist_ok=True)
        for directory in (base, path, *(os.path.join(path, sub) for sub in ("tmp", "new", "cur"))):
            if not os.path.isdir(directory):
                os.mkdir(directory, mode=0o700)
                os.chown(directory, uid, gid)
        return path

    def deliver(self, user: str, message: bytes, folder: str = "INBOX") -> str:
        """Put `message` (bytes as given: CRLF or LF) into the folder's new/; returns the file name."""
        path = self.maildir(user, folder)
        self._sequence += 1
        unique = f"M{self._sequence}P{os.getpid()}R{secrets.token_hex(4)}"
        name = f"{int(time.time())}.{unique}.mailgate-test,S={len(message)}"
        temporary = os.path.join(path, "tmp", name)
        with open(temporary, "wb") as handle:
            handle.write(message)
        uid, gid = _delivery_ids()
        os.chown(temporary, uid, gid)
        os.rename(temporary, os.path.join(path, "new", name))
        return name

    def messages(self, user: str, folder: str = "INBOX") -> list[StoredMessage]:
        """What is in the folder now (new/ and cur/), oldest delivery first."""
        path = self.maildir(user, folder)
        found: list[tuple[tuple[int, str], StoredMessage]] = []
        for sub in ("new", "cur"):
            for entry in os.listdir(os.path.join(path, sub)):
                base, _, info = entry.partition(":")
                flags = "".join(sorted(info[2:])) if info.startswith("2,") else ""
                with open(os.path.join(path, sub, entry), "rb") as handle:
                    content = handle.read()
                # Maildir names start with the delivery time; ours then count up (".M<n>P").
                stamp, _, rest = base.partition(".")
                sequence = rest[1:].partition("P")[0] if rest.startswith("M") else ""
                order = int(stamp) if stamp.isdigit() else 0
                found.append(((order, sequence.zfill(12) + base), StoredMessage(entry, flags, content)))
        found.sort(key=lambda item: item[0])
        return [message for _order, message in found]

    def doveadm(self, *args: str, timeout: float = 30.0) -> str:
        """Run `doveadm -c <our config> args...`; its standard output."""
        return _run([_program("doveadm"), "-c", self.config_path, *args], "doveadm", timeout).stdout

    # -- life cycle ---------------------------------------------------------------------------------

    def _start(self, timeout: float) -> None:
        if self._ca is None:
            self._ca = CertificateAuthority(os.path.join(self.directory, "ca"))
            certificate = self._ca.issue("localhost", dns_names=("localhost",), ips=(HOST,))
            self.ca_file = certificate.ca_file
            self._certificate = certificate
        self.pop3_port = self.port
        taken = {self.port}
        ports: list[int] = []
        while len(ports) < 3:
            port = free_port(self.host)
            if port not in taken:
                taken.add(port)
                ports.append(port)
        self.pop3s_port, self.imap_port, self.imaps_port = ports
        uid, gid = _delivery_ids()
        _write(
            self.config_path,
            _DOVECOT_MAIL_CONF.format(
                root=self.directory,
                token=secrets.token_hex(4),
                host=self.host,
                uid=uid,
                gid=gid,
                cert_file=self._certificate.cert_file,
                key_file=self._certificate.key_file,
                pop3_port=self.pop3_port,
                pop3s_port=self.pop3s_port,
                imap_port=self.imap_port,
                imaps_port=self.imaps_port,
            )
            + self.extra_config,
        )
        passwd = "".join(f"{user}:{{PLAIN}}{password}::::::\n" for user, password in self.users.items())
        _write(os.path.join(self.directory, "passwd"), passwd, 0o644)
        for sub in ("run", "state", "home"):
            os.makedirs(os.path.join(self.directory, sub), mode=0o755, exist_ok=True)
        for user in self.users:
            home = os.path.join(self.directory, "home", user)
            os.makedirs(home, mode=0o700, exist_ok=True)
            os.chown(home, uid, gid)
            self.maildir(user)
        _run([_program("doveconf"), "-c", self.config_path, "-n"], "doveconf (checking dovecot.conf)")
        self._daemon = _Daemon([_program("dovecot"), "-F", "-c", self.config_path], self.log_path)
        deadline = time.monotonic() + timeout
        waiting = [self.pop3_port, self.pop3s_port, self.imap_port, self.imaps_port]
        while time.monotonic() < deadline:
            if not self._daemon.running():
                raise PeerError("dovecot exited during start-up")
            waiting = [port for port in waiting if not self._listening(port)]
            if not waiting and self._greets(self.pop3_port, b"+OK") and self._greets(self.imap_port, b"* OK"):
                return
            time.sleep(0.05)
        raise TimeoutError(f"dovecot not listening on {waiting} within {timeout:.0f} s")

    def _listening(self, port: int) -> bool:
        try:
            with socket.create_connection((self.host, port), timeout=1.0):
                return True
        except OSError:
            return False

    def _greets(self, port: int, start: bytes) -> bool:
        try:
            with socket.create_connection((self.host, port), timeout=2.0) as conn:
                conn.settimeout(2.0)
                return conn.recv(512).startswith(start)
        except OSError:
            return False

    def _stop_processes(self) -> None:
        if self._daemon is not None:
            self._daemon.stop()
            self._daemon = None


def main() -> None:
    """Start one for manual poking: python -m tests.integration.peer_dovecot_mail."""
    with DovecotMail() as peer:
        assert isinstance(peer, DovecotMail)
        peer.deliver("alice", b"From: a@example.net\r\nSubject: hello\r\n\r\nbody\r\n")
        print(f"pop3 {peer.pop3_port} pop3s {peer.pop3s_port} imap {peer.imap_port} imaps {peer.imaps_port}")
        print(f"users {peer.users}; ca {peer.ca_file}; dir {peer.directory}")
        with contextlib.suppress(KeyboardInterrupt):
            subprocess.run(["sleep", "infinity"], check=False)


if __name__ == "__main__":
    main()
