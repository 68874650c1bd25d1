"""The [fetch] configuration: the external mailboxes to poll, and how.

`parse_fetch(section, base_dir)` reads the ``[fetch]`` table and its
``[[fetch.accounts]]`` into a frozen `FetchConfig`; every default is here and
in etc/mailgate.toml. A problem names the file, the key and the line (the
`Section` does it). Passwords are not read here but at start-up
(`read_passwords`, called by the composition root before privileges are
dropped), so that `mailgatectl` can read the configuration without them; the
file's permissions are checked in both places, when the file can be seen.
A password is never logged nor shown (its field has no repr).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping

import attrs

from gateway.config import ConfigError, Section
from gateway.fetch import MailboxAccount

__all__ = [
    "DEFAULT_ENVELOPE_HEADERS",
    "MAX_IDLE_FOLDERS",
    "FetchAccount",
    "FetchConfig",
    "MultidropConfig",
    "default_port",
    "parse_fetch",
    "read_passwords",
]

PROTOCOLS = ("pop3", "imap", "pop2")
TLS_MODES = ("implicit", "starttls", "none")
REFUSALS = ("quarantine", "tag", "delete")
MAX_IDLE_FOLDERS = 8  # one IDLE session per folder; servers cap a user's connections (Dovecot: 10)
AUTH_MODES = {
    "pop3": ("auto", "user", "apop", "xoauth2"),
    "imap": ("auto", "plain", "login", "xoauth2"),
    "pop2": ("auto",),
}
DEFAULT_ENVELOPE_HEADERS = ("Delivered-To", "X-Original-To", "Envelope-To")
_PORTS = {
    ("pop3", True): 995,
    ("pop3", False): 110,
    ("imap", True): 993,
    ("imap", False): 143,
    ("pop2", True): 109,  # POP2 over TLS has no port of its own
    ("pop2", False): 109,
}


def default_port(protocol: str, tls: str) -> int:
    """The standard port: 995/110 for POP3, 993/143 for IMAP (implicit TLS or not), 109 for POP2."""
    return _PORTS[(protocol, tls == "implicit")]


@attrs.frozen
class MultidropConfig:
    """A "public mailbox": one external mailbox whose messages belong to many internal users.

    The recipients come from the first of `headers` that names an address of
    ours (a domain of `local_domains` or of `domain_map`), else from To/Cc when
    `fallback` is on. An address of ours becomes `local_parts[local part]`, or
    the same local part in `domain_map[domain]`; anything else (and a message
    naming nobody of ours) goes to `unknown` ("" = the postmaster): never dropped.
    """

    headers: tuple[str, ...] = DEFAULT_ENVELOPE_HEADERS
    local_domains: tuple[str, ...] = ()
    local_parts: tuple[tuple[str, str], ...] = ()  # external local part (lower case) -> internal address
    domain_map: tuple[tuple[str, str], ...] = ()  # external domain -> internal domain
    fallback: bool = True  # To/Cc when no envelope header names one of ours
    unknown: str = ""  # "" = the account's postmaster

    @property
    def parts(self) -> Mapping[str, str]:
        return dict(self.local_parts)

    @property
    def domains(self) -> Mapping[str, str]:
        return dict(self.domain_map)


@attrs.frozen
class FetchAccount:
    """One external mailbox (POP3 maildrop, or IMAP folders) and where its mail goes."""

    name: str
    protocol: str
    server: str
    port: int
    username: str
    password_file: str
    password: str = attrs.field(default="", repr=False)  # read at start (`read_passwords`)
    tls: str = "implicit"
    verify: bool = True
    ca_file: str = ""
    tls_name: str = ""
    auth: str = "auto"
    interval: float = 60.0
    keep: bool = False  # False: deleted on the server once queued
    delete_after: float = 0.0  # keep = true: delete what was first fetched this long ago (0 = never)
    folders: tuple[str, ...] = ("INBOX",)  # IMAP; POP3 has one maildrop
    max_size: int = 0  # larger messages stay on the server, reported once (0 = no limit)
    max_messages: int = 0  # per poll (0 = all)
    deliver_to: tuple[str, ...] = ()  # single-drop: every message to these
    multidrop: MultidropConfig | None = None
    timeout: float = 60.0  # seconds any one server answer may take
    idle: bool = False  # IMAP: each folder watched in IDLE between polls (new mail polled within a second)
    move_to: str = ""  # IMAP: move fetched mail to this folder instead of deleting it ("" = delete)
    sdps: bool = False  # POP3 multidrop: the envelope recipients from SDPS's *ENV, ahead of the headers
    token_command: str = attrs.field(default="", repr=False)  # auth "xoauth2": prints the access token
    postmaster: str = ""  # resolved: where refused and unknown recipients go ("" = none given)
    line: int | None = None  # where the account starts in the file, for messages at start-up

    def mailbox(self, folder: str = "INBOX") -> MailboxAccount:
        """What a protocol client needs to open one of this account's mailboxes."""
        return MailboxAccount(
            host=self.server,
            port=self.port,
            username=self.username,
            password=self.password,
            tls=self.tls,
            verify=self.verify,
            ca_file=self.ca_file,
            tls_name=self.tls_name,
            auth=self.auth,
            folder=folder,
            timeout=self.timeout,
        )

    @property
    def source(self) -> str:
        """How logs and Session.fetched_from name it: "pop3 sales@pop.example.net"."""
        return f"{self.protocol} {self.username}@{self.server}"


@attrs.frozen
class FetchConfig:
    """The [fetch] table: defaults and the accounts."""

    accounts: tuple[FetchAccount, ...] = ()
    interval: float = 60.0
    per_server_sessions: int = 2
    on_refusal: str = "quarantine"  # what a filter's refusal of fetched mail becomes
    max_messages_per_poll: int = 0
    postmaster: str = ""  # "" = the gateway's


def parse_fetch(section: Section, base_dir: str) -> FetchConfig:
    """The [fetch] table (``root.sub("fetch")``) as a FetchConfig; ConfigError on a problem."""
    interval = section.duration("interval", 60)
    if interval <= 0:
        raise section.error("interval", "must be longer than 0 s")
    defaults = FetchConfig(
        interval=interval,
        per_server_sessions=section.positive("per_server_sessions", 2),
        on_refusal=section.choice("on_refusal", REFUSALS, "quarantine"),
        max_messages_per_poll=_count(section, "max_messages_per_poll", 0),
        postmaster=_address(section, "postmaster", section.take("postmaster", str, "")),
    )
    raw_accounts = section.take("accounts", list, [])
    accounts: list[FetchAccount] = []
    names: set[str] = set()
    for number, raw in enumerate(raw_accounts):
        if not isinstance(raw, dict):
            raise section.error("accounts", "must be a list of tables ([[fetch.accounts]])")
        table = Section(section.source, section.text, raw, f"{section.path}.accounts[{number}]")
        account = _account(table, defaults, base_dir)
        if account.name in names:
            raise table.error("name", f"{account.name!r} is the name of another account")
        names.add(account.name)
        accounts.append(account)
    section.done()
    return attrs.evolve(defaults, accounts=tuple(accounts))


def _account(table: Section, defaults: FetchConfig, base_dir: str) -> FetchAccount:
    name = table.take("name", str, "")
    if not name or any(char.isspace() for char in name):
        raise table.error("name", "is required: a short name without spaces (for logs and mailgatectl)")
    protocol = table.choice("protocol", PROTOCOLS, "pop3")
    server = table.take("server", str, "")
    if not server:
        raise table.error("server", 'is required (like "pop.example.net")')
    tls = table.choice("tls", TLS_MODES, "implicit")
    if protocol == "pop2" and tls == "starttls":
        raise table.error(
            "tls", 'POP2 has no STARTTLS: "implicit" (a TLS-wrapped port) or "none" with insecure'
        )
    insecure = table.take("insecure", bool, False)
    if tls == "none" and not insecure:
        raise table.error(
            "tls",
            'is "none": the password would cross the network in plain text;'
            " add insecure = true to this account if that is really meant",
        )
    port = table.take("port", int, 0)
    if not 0 <= port <= 65535:
        raise table.error("port", f"must be a port number (0 = the protocol's), not {port}")
    username = table.take("username", str, "")
    if not username:
        raise table.error("username", "is required")
    auth = table.choice("auth", AUTH_MODES[protocol], "auto")
    token_command = table.take("token_command", str, "")
    if auth == "xoauth2" and not token_command.strip():
        raise table.error(
            "token_command", 'is required with auth = "xoauth2": a command printing the access token'
        )
    if token_command and auth != "xoauth2":
        raise table.error("token_command", 'is only used with auth = "xoauth2"')
    password_file = table.take("password_file", str, "")
    if auth == "xoauth2":
        if password_file:
            raise table.error(
                "password_file", 'is not used with auth = "xoauth2" (the token command gives the token)'
            )
    elif not password_file:
        raise table.error(
            "password_file", "is required: a file holding the password, readable by the gateway only"
        )
    else:
        password_file = os.path.normpath(os.path.join(base_dir, password_file))
        problem = _password_file_problem(password_file, reading=False)
        if problem:
            raise table.error("password_file", problem)
    interval = table.duration("interval", defaults.interval)
    if interval <= 0:
        raise table.error("interval", "must be longer than 0 s")
    keep = table.take("keep", bool, False)
    delete_after = table.duration("delete_after", 0)
    if delete_after and not keep:
        raise table.error(
            "delete_after", "only applies to kept mail (keep = true); without keep all is deleted"
        )
    if "folders" in table.table and protocol != "imap":
        raise table.error("folders", "is for IMAP accounts only (a POP3 or POP2 maildrop has no folders)")
    folders = table.strings("folders", ("INBOX",))
    if not folders or len(set(folders)) != len(folders) or any(not folder for folder in folders):
        raise table.error("folders", "must list one or more distinct folder names")
    idle, move_to = _imap_options(table, protocol, keep, delete_after, folders)
    deliver_to = tuple(_address(table, "deliver_to", address) for address in table.strings("deliver_to"))
    multidrop = _multidrop(table.sub("multidrop")) if "multidrop" in table.table else None
    if bool(deliver_to) == (multidrop is not None):
        raise table.error(
            "deliver_to" if deliver_to else "",
            "give exactly one of deliver_to (single-drop: internal addresses) or a multidrop table",
        )
    sdps = table.take("sdps", bool, False)
    if sdps and protocol != "pop3":
        raise table.error("sdps", "is a POP3 extension (*ENV): for POP3 accounts only")
    if sdps and multidrop is None:
        raise table.error(
            "sdps", "gives the envelope recipients of a multidrop mailbox; this account has none"
        )
    account = FetchAccount(
        name=name,
        protocol=protocol,
        server=server,
        port=port or default_port(protocol, tls),
        username=username,
        password_file=password_file,
        tls=tls,
        verify=table.take("verify", bool, True),
        ca_file=_path(table, "ca_file", base_dir),
        tls_name=table.take("tls_name", str, ""),
        auth=auth,
        interval=interval,
        keep=keep,
        delete_after=delete_after,
        folders=folders,
        max_size=table.size("max_size", 0),
        max_messages=_count(table, "max_messages", defaults.max_messages_per_poll),
        deliver_to=deliver_to,
        multidrop=multidrop,
        timeout=table.duration("timeout", 60),
        idle=idle,
        move_to=move_to,
        sdps=sdps,
        token_command=token_command,
        postmaster=_address(table, "postmaster", table.take("postmaster", str, defaults.postmaster)),
        line=_line(table),
    )
    if account.timeout <= 0:
        raise table.error("timeout", "must be longer than 0 s")
    table.done()
    return account


def _imap_options(
    table: Section, protocol: str, keep: bool, delete_after: float, folders: tuple[str, ...]
) -> tuple[bool, str]:
    """`idle` and `move_to`, which only an IMAP account may have."""
    for key in ("idle", "move_to"):
        if key in table.table and protocol != "imap":
            raise table.error(key, "is for IMAP accounts only (POP3 has neither IDLE nor folders)")
    idle = table.take("idle", bool, False)
    if idle and len(folders) > MAX_IDLE_FOLDERS:
        raise table.error(
            "idle",
            f"watches each folder on a connection of its own: at most {MAX_IDLE_FOLDERS} folders"
            f" (this account has {len(folders)}; servers limit a user's connections)",
        )
    move_to = table.take("move_to", str, "")
    if move_to in folders:
        raise table.error("move_to", f"{move_to!r} is one of the folders fetched: its mail would come again")
    if move_to and keep and not delete_after:
        raise table.error(
            "move_to",
            "replaces the deletion on the server, and with keep = true and no delete_after"
            " nothing is ever deleted; remove one of them",
        )
    return idle, move_to


def _multidrop(table: Section) -> MultidropConfig:
    headers = table.strings("headers", DEFAULT_ENVELOPE_HEADERS)
    for header in headers:
        if not header or any(char.isspace() or char == ":" for char in header):
            raise table.error("headers", f"{header!r} is not a header name")
    local_domains = tuple(_domain(table, "local_domains", d) for d in table.strings("local_domains"))
    parts: list[tuple[str, str]] = []
    for local, target in table.take("local_parts", dict, {}).items():
        if not isinstance(target, str):
            raise table.error("local_parts", f"{local!r} must map to an address (a string)")
        parts.append((local.lower(), _address(table, "local_parts", target)))
    domain_map: list[tuple[str, str]] = []
    for external, internal in table.take("domain_map", dict, {}).items():
        if not isinstance(internal, str):
            raise table.error("domain_map", f"{external!r} must map to a domain (a string)")
        domain_map.append((_domain(table, "domain_map", external), _domain(table, "domain_map", internal)))
    if not local_domains and not domain_map:
        raise table.error("local_domains", "is required: the external domains whose mail this mailbox holds")
    multidrop = MultidropConfig(
        headers=headers,
        local_domains=local_domains,
        local_parts=tuple(parts),
        domain_map=tuple(domain_map),
        fallback=table.take("fallback", bool, True),
        unknown=_address(table, "unknown", table.take("unknown", str, "")),
    )
    table.done()
    return multidrop


def read_passwords(fetch: FetchConfig, source: str) -> FetchConfig:
    """The config with every account's password read from its file (at start-up).

    The first line of the file is the password (its line end removed). A file
    others may read, or one that cannot be read, is a ConfigError naming the
    account's password_file key; the password itself never appears anywhere.
    """
    accounts = []
    for number, account in enumerate(fetch.accounts):
        if account.auth == "xoauth2":  # no password: a token from its command at each login
            accounts.append(account)
            continue
        key = f"fetch.accounts[{number}].password_file"
        problem = _password_file_problem(account.password_file, reading=True)
        if problem:
            raise ConfigError(source, key, problem, account.line)
        try:
            with open(account.password_file, encoding="utf-8") as handle:
                password = handle.readline().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(
                source, key, f"cannot read {account.password_file}: {error}", account.line
            ) from None
        if not password:
            raise ConfigError(
                source,
                key,
                f"{account.password_file} holds no password (its first line is empty)",
                account.line,
            )
        accounts.append(attrs.evolve(account, password=password))
    return attrs.evolve(fetch, accounts=tuple(accounts))


def _password_file_problem(path: str, *, reading: bool) -> str:
    """Why this password file may not be used, or "" (parsing: a file we may not see is left for start-up)."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return f"{path} does not exist"
    except PermissionError:
        return f"{path} cannot be reached (permission denied)" if reading else ""
    except OSError as error:
        return f"{path}: {error.strerror}"
    if not stat.S_ISREG(status.st_mode):
        return f"{path} is not a regular file"
    if status.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        return (
            f"{path} may be read by others (mode {stat.S_IMODE(status.st_mode):04o});"
            f" make it readable by the gateway only: chmod 600 {path}"
        )
    return ""


def _count(table: Section, key: str, default: int) -> int:
    value = table.take(key, int, default)
    if value < 0:
        raise table.error(key, f"must be 0 (no limit) or more, not {value}")
    return value


def _address(table: Section, key: str, address: str) -> str:
    if not address:
        return ""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or any(char.isspace() or char in "<>," for char in address):
        raise table.error(key, f"{address!r} is not a mail address (user@domain)")
    return address


def _domain(table: Section, key: str, domain: str) -> str:
    domain = domain.lower().rstrip(".")
    if not domain or "@" in domain or any(char.isspace() for char in domain):
        raise table.error(key, f"{domain!r} is not a domain name")
    return domain


def _path(table: Section, key: str, base_dir: str) -> str:
    value = table.take(key, str, "")
    return os.path.normpath(os.path.join(base_dir, value)) if value else ""


def _line(table: Section) -> int | None:
    error = table.error("name", "")
    return error.line
