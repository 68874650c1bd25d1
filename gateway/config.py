"""The configuration: one TOML file into frozen values, with every default here.

A bad file stops start-up with one message naming the file, the line and the key
(`ConfigError`). `etc/mailgate.toml` documents every key; `EMBEDDED_DEFAULTS`
is what the gateway runs with when no file is given: a loopback listener, the
state under ./mailgate-state, and mail for example.com into a local Maildir.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from gateway.content import ContentLimits
from gateway.model import Role

if TYPE_CHECKING:
    from gateway.fetch.accounts import FetchConfig

T = TypeVar("T")

TLS_POLICIES = ("none", "may", "encrypt", "verify")
RELAY_MODES = ("never", "on-failure", "always")


class ConfigError(Exception):
    """A configuration problem, with where it is and what to do."""

    def __init__(self, source: str, key: str, problem: str, line: int | None = None) -> None:
        where = f"{source}, line {line}" if line else source
        super().__init__(f"{where}: {key}: {problem}" if key else f"{where}: {problem}")
        self.source = source
        self.key = key
        self.line = line


@attrs.frozen
class ListenerConfig:
    endpoint: str
    role: Role = Role.INBOUND
    require_tls: bool = False  # refuse MAIL before STARTTLS (a submission port)


@attrs.frozen
class SmtpConfig:
    listeners: tuple[ListenerConfig, ...]
    max_recipients: int = 16
    max_message_size: int = 100 * 1024 * 1024
    max_hops: int = 32
    idle_timeout: float = 300.0
    max_commands: int = 1000
    max_errors: int = 10
    soft_error_limit: int = 5  # errors after which every error reply waits error_delay
    error_delay: float = 1.0
    vrfy: bool = False
    etrn: bool = True
    reject_bare_lf: bool = True
    auth_requires_tls: bool = True
    banner: str = "ESMTP MailGate"
    workers: int = 0  # SMTP server processes; 0 = the listeners run in the main process


@attrs.frozen
class TlsConfig:
    certificate: str = ""  # PEM certificate chain for STARTTLS (server side)
    private_key: str = ""  # PEM key; may be the same file as the certificate
    ca_file: str = ""  # trust roots for verifying peers; "" = the system's


@attrs.frozen
class AuthConfig:
    credentials_file: str = ""  # "user:{SCHEME}hash" lines; "" = no AUTH offered


@attrs.frozen
class RelayConfig:
    domains: tuple[str, ...] = ()  # we accept mail for these from anyone
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def accepts_domain(self, domain: str) -> bool:
        return domain_matches(domain, self.domains)


@attrs.frozen
class RouteConfig:
    match: str  # "example.com", "*.example.com" or "*"
    transport: str  # "smtp:[host]:port, ..." | "mx" | "relay" | "lmtp:..." | "maildir:..."
    tls: str = "may"  # for smtp/mx: none / may / encrypt / verify
    line: int | None = None


@attrs.frozen
class UpstreamConfig:
    """The upstream smart host (the `relay` transport)."""

    host: str = ""  # "[smtp.provider.example]:587"
    mode: str = "never"  # never / on-failure / always
    username: str = ""
    password_file: str = ""  # a file whose first line is the password
    tls: str = "encrypt"


@attrs.frozen
class DeliveryConfig:
    concurrency: int = 25
    per_destination: int = 20
    retry_schedule: tuple[float, ...] = (480.0,)  # the last interval repeats
    max_attempts: int = 16
    queue_scan_interval: float = 15.0
    connect_timeout: float = 30.0
    command_timeout: float = 300.0


@attrs.frozen
class DnsConfig:
    nameservers: tuple[str, ...] = ()  # "ip" or "ip:port"; () = /etc/resolv.conf
    timeout: float = 5.0
    threads: int = 8


FAILURE_ACTIONS = ("defer", "reject", "continue")


@attrs.frozen
class FiltersConfig:
    """The filter chains: names in order, per direction; options per filter.

    `options` maps an instance name to its raw ``[filters.<name>]`` table; the
    registry checks it (with `text` for line numbers) when it builds the filter.
    """

    inbound: tuple[str, ...] = ("lists", "limits", "helo")
    outbound: tuple[str, ...] = ()
    fetched: tuple[str, ...] = ()
    timeout: float = 30.0  # seconds one filter call may take
    on_failure: str = "defer"  # a filter that fails or times out: defer | reject | continue
    headers: bool = True  # add X-Mailgate-* headers recording the filters that hit
    options: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict, eq=False)
    text: str = attrs.field(default="", eq=False, repr=False)

    def section(self, source: str, name: str) -> Section:
        """The options of filter instance `name`, as a Section naming file and line."""
        return Section(source, self.text, self.options.get(name, {}), f"filters.{name}")


@attrs.frozen
class GatewayConfig:
    hostname: str
    state_dir: str
    user: str = "nobody"  # only used when started as root
    group: str = ""
    hash_levels: int = 2
    control_socket: str = ""  # "" = <state_dir>/control.sock
    max_open_files: int = 65536
    postmaster: str = ""  # "" = postmaster@<the first relay domain, or hostname>


@attrs.frozen
class QuarantineConfig:
    retention: float = 30 * 86400.0  # quarantined messages older than this are deleted
    notice_time: str = "08:00"  # local time of the daily notice; "" = no notice
    notice_to: str = ""  # "" = the postmaster
    keep_rejected: bool = False  # keep a copy of mail refused at the end of DATA, for review


@attrs.frozen
class Config:
    source: str
    gateway: GatewayConfig
    smtp: SmtpConfig
    tls: TlsConfig
    auth: AuthConfig
    relay: RelayConfig
    routes: tuple[RouteConfig, ...]
    upstream: UpstreamConfig
    delivery: DeliveryConfig
    dns: DnsConfig
    filters: FiltersConfig = FiltersConfig()
    quarantine: QuarantineConfig = QuarantineConfig()
    content: ContentLimits = ContentLimits()  # noqa: RUF009 (frozen: one shared default is safe)
    fetch: FetchConfig = attrs.field(factory=lambda: _no_fetch())

    @property
    def postmaster(self) -> str:
        """Where the gateway's notices go."""
        if self.gateway.postmaster:
            return self.gateway.postmaster
        domain = next((d for d in self.relay.domains if "*" not in d), self.gateway.hostname)
        return f"postmaster@{domain}"

    @property
    def spool_dir(self) -> str:
        return os.path.join(self.gateway.state_dir, "spool")

    @property
    def control_socket(self) -> str:
        return self.gateway.control_socket or os.path.join(self.gateway.state_dir, "control.sock")


def domain_matches(domain: str, patterns: tuple[str, ...]) -> bool:
    """Whether a domain is one of `patterns` ("example.com", "*.example.com", "*")."""
    domain = domain.lower().rstrip(".")
    for pattern in patterns:
        if pattern == "*" or pattern == domain:
            return True
        if pattern.startswith("*.") and domain.endswith(pattern[1:]):
            return True
    return False


EMBEDDED_DEFAULTS = """
[gateway]
state_dir = "mailgate-state"
user = ""  # a demo on a high port: stay who started it (a config file defaults to "nobody")

[[smtp.listeners]]
endpoint = "tcp:2525:interface=127.0.0.1"
role = "inbound"

[relay]
domains = ["example.com"]
networks = ["127.0.0.0/8", "::1/128"]

[[routes]]
match = "example.com"
transport = "maildir:mailgate-state/mail/{domain}/{local}/"

[[routes]]
match = "*"
transport = "mx"
"""


# --- reading -------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?)b?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


class Section:
    """Takes keys out of one TOML table, checking types and remembering lines.

    Filters get their ``[filters.<name>]`` table as one of these: take every key
    with a default, then call `done()` so that an unknown key is an error.
    """

    def __init__(self, source: str, text: str, table: Mapping[str, Any], path: str) -> None:
        self.source = source
        self.text = text
        self.table = dict(table)
        self.path = path  # "smtp" or "routes[2]"
        self.read: dict[str, object] = {}  # every key read -> the value it gave (for the docs test)

    def error(self, key: str, problem: str) -> ConfigError:
        """An error about `key` of this table ("" for the table itself)."""
        if not key:
            return ConfigError(self.source, self.path, problem, _find_line(self.text, self.path, "\0"))
        full = f"{self.path}.{key}" if self.path else key
        return ConfigError(self.source, full, problem, _find_line(self.text, self.path, key))

    def take(self, key: str, kind: type[T], default: T) -> T:
        self.read[key] = value = self._take(key, kind, default)
        return value

    def _take(self, key: str, kind: type[T], default: T) -> T:
        if key not in self.table:
            return default
        value = self.table.pop(key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(key, f"must be {_kind_name(kind)}, not {_kind_name(type(value))}")
        return value

    def duration(self, key: str, default: float) -> float:
        value = self.table.pop(key, default)
        parsed = _parse_duration(value)
        if parsed is None:
            raise self.error(key, f'must be a duration like 300, "300s", "8m", "1h", not {value!r}')
        self.read[key] = parsed
        return parsed

    def positive_duration(self, key: str, default: float) -> float:
        """A duration that must be longer than 0 s."""
        value = self.duration(key, default)
        if value <= 0:
            raise self.error(key, "must be longer than 0 s")
        return value

    def size(self, key: str, default: int) -> int:
        value = self.table.pop(key, default)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            self.read[key] = value
            return value
        match = _SIZE.match(value) if isinstance(value, str) else None
        if not match:
            raise self.error(key, f'must be a size like 104857600 or "100M", not {value!r}')
        self.read[key] = result = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
        return result

    def positive(self, key: str, default: int) -> int:
        value = self.take(key, int, default)
        if value < 1:
            raise self.error(key, f"must be at least 1, not {value}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.take(key, str, default)
        if value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}; not {value!r}")
        return value

    def strings(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.take(key, list, list(default))
        for item in value:
            if not isinstance(item, str):
                raise self.error(key, f"must be a list of strings; {item!r} is not a string")
        return tuple(value)

    def sub(self, key: str) -> Section:
        value = self.take(key, dict, {})
        return Section(self.source, self.text, value, f"{self.path}.{key}" if self.path else key)

    def done(self) -> None:
        for key in self.table:
            raise self.error(key, "unknown key (see etc/mailgate.toml for the documented keys)")


def _kind_name(kind: type) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        list: "a list",
        dict: "a table",
    }.get(kind, kind.__name__)


def _parse_duration(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if value >= 0 else None
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNITS[match.group(2)]
    return None


def _find_line(text: str, path: str, key: str) -> int | None:
    """The line where `key` is set inside the table `path` ("routes[1]", "smtp.listeners[0]")."""
    table = re.sub(r"\[\d+\]", "", path)
    index = [int(n) for n in re.findall(r"\[(\d+)\]", path)]
    wanted = index[-1] if index else 0
    current: str | None = ""
    seen = -1
    key_re = re.compile(rf"^\s*(\"{re.escape(key)}\"|{re.escape(key)})\s*=")
    header = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?")
    for number, line in enumerate(text.splitlines(), 1):
        found = header.match(line)
        if found:
            current = found.group(1)
            if current == table:
                seen += 1
            continue
        if current == table and (not index or seen == wanted) and key_re.match(line):
            return number
        if not table and current == "" and key_re.match(line):
            return number
    # a key of a table that is missing: point at the table's header
    for number, line in enumerate(text.splitlines(), 1):
        found = header.match(line)
        if found and found.group(1) == table:
            return number
    return None


def _workers(reader: Section) -> int:
    value = reader.table.pop("workers", "auto")
    if value == "auto":
        # the main process (queue, delivery) needs a core too: measured on 2 vCPUs, one
        # worker relays 10-40% more than two (docs/benchmarks.rst)
        return max(1, (os.cpu_count() or 1) - 1)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 31:
        raise reader.error("workers", f'must be "auto" or a number from 0 to 31, not {value!r}')
    return value


def _network(reader: Section, key: str, text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise reader.error(key, f'{text!r} is not an IP network (like "192.168.0.0/16")') from None


def _check_endpoint(reader: Section, key: str, endpoint: str) -> None:
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(reactor, endpoint)  # type: ignore[no-untyped-call]
    except (ValueError, TypeError, KeyError) as error:
        raise reader.error(key, f"bad endpoint {endpoint!r}: {error}") from None


def _check_transport(reader: Section, key: str, spec: str) -> None:
    from gateway.delivery.router import TransportSpecError, parse_transport

    try:
        parse_transport(spec)
    except TransportSpecError as error:
        raise reader.error(key, str(error)) from None


def load_toml(text: str, source: str) -> dict[str, Any]:
    """A TOML text as a table; a syntax error is a ConfigError naming the file and line."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        line = re.search(r"line (\d+)", str(error))
        raise ConfigError(
            source, "", f"TOML syntax error: {error}", int(line.group(1)) if line else None
        ) from None


def parse(text: str, source: str = "<config>", *, base_dir: str | None = None) -> Config:
    """Parse and validate a configuration text; raise ConfigError naming the problem."""
    data = load_toml(text, source)
    root = Section(source, text, data, "")
    base = base_dir if base_dir is not None else os.getcwd()

    def path_of(reader: Section, key: str, default: str) -> str:
        value = reader.take(key, str, default)
        return os.path.normpath(os.path.join(base, value)) if value else ""

    section = root.sub("gateway")
    gateway = GatewayConfig(
        hostname=section.take("hostname", str, socket.getfqdn()),
        state_dir=path_of(section, "state_dir", "/var/lib/mailgate"),
        user=section.take("user", str, "nobody"),
        group=section.take("group", str, ""),
        hash_levels=section.take("hash_levels", int, 2),
        control_socket=path_of(section, "control_socket", ""),
        max_open_files=section.positive("max_open_files", 65536),
        postmaster=section.take("postmaster", str, ""),
    )
    if gateway.postmaster and "@" not in gateway.postmaster:
        raise section.error("postmaster", f"{gateway.postmaster!r} is not a mail address (user@domain)")
    if not 0 <= gateway.hash_levels <= 4:
        raise section.error("hash_levels", "must be between 0 and 4")
    section.done()

    section = root.sub("smtp")
    listeners = []
    raw_listeners = section.take("listeners", list, [])
    for number, raw in enumerate(raw_listeners):
        if not isinstance(raw, dict):
            raise section.error("listeners", "must be a list of tables ([[smtp.listeners]])")
        listener = Section(source, text, raw, f"smtp.listeners[{number}]")
        endpoint = listener.take("endpoint", str, "")
        if not endpoint:
            raise listener.error("endpoint", 'is required (like "tcp:25")')
        _check_endpoint(listener, "endpoint", endpoint)
        role = listener.choice("role", tuple(r.value for r in Role), "inbound")
        listeners.append(ListenerConfig(endpoint, Role(role), listener.take("require_tls", bool, False)))
        listener.done()
    smtp = SmtpConfig(
        listeners=tuple(listeners),
        max_recipients=section.positive("max_recipients", 16),
        max_message_size=section.size("max_message_size", 100 * 1024 * 1024),
        max_hops=section.positive("max_hops", 32),
        idle_timeout=section.duration("idle_timeout", 300),
        max_commands=section.positive("max_commands", 1000),
        max_errors=section.positive("max_errors", 10),
        soft_error_limit=section.take("soft_error_limit", int, 5),
        error_delay=section.duration("error_delay", 1),
        vrfy=section.take("vrfy", bool, False),
        etrn=section.take("etrn", bool, True),
        reject_bare_lf=section.take("reject_bare_lf", bool, True),
        auth_requires_tls=section.take("auth_requires_tls", bool, True),
        banner=section.take("banner", str, "ESMTP MailGate"),
        workers=_workers(section),
    )
    section.done()

    section = root.sub("tls")
    tls = TlsConfig(
        certificate=path_of(section, "certificate", ""),
        private_key=path_of(section, "private_key", ""),
        ca_file=path_of(section, "ca_file", ""),
    )
    if tls.private_key and not tls.certificate:
        raise section.error("certificate", "is required when private_key is set")
    section.done()

    section = root.sub("auth")
    auth = AuthConfig(credentials_file=path_of(section, "credentials_file", ""))
    section.done()

    section = root.sub("relay")
    relay = RelayConfig(
        domains=tuple(d.lower().rstrip(".") for d in section.strings("domains")),
        networks=tuple(
            _network(section, "networks", n) for n in section.strings("networks", ("127.0.0.0/8", "::1/128"))
        ),
    )
    section.done()

    routes = []
    for number, raw in enumerate(root.take("routes", list, [])):
        if not isinstance(raw, dict):
            raise root.error("routes", "must be a list of tables ([[routes]])")
        route = Section(source, text, raw, f"routes[{number}]")
        match = route.take("match", str, "")
        if not match:
            raise route.error("match", 'is required (a domain, "*.domain" or "*")')
        transport = route.take("transport", str, "")
        if not transport:
            raise route.error("transport", 'is required (like "mx" or "smtp:[10.0.0.5]:25")')
        _check_transport(route, "transport", transport)
        if transport.startswith("maildir:"):
            target = transport[len("maildir:") :]
            transport = "maildir:" + os.path.join(base, target)
        routes.append(
            RouteConfig(
                match=match.lower().rstrip("."),
                transport=transport,
                tls=route.choice("tls", TLS_POLICIES, "may"),
                line=_find_line(text, f"routes[{number}]", "match"),
            )
        )
        route.done()

    section = root.sub("upstream")
    upstream = UpstreamConfig(
        host=section.take("host", str, ""),
        mode=section.choice("mode", RELAY_MODES, "never"),
        username=section.take("username", str, ""),
        password_file=path_of(section, "password_file", ""),
        tls=section.choice("tls", TLS_POLICIES, "encrypt"),
    )
    if upstream.mode != "never" and not upstream.host:
        raise section.error("host", f"is required when mode is {upstream.mode!r}")
    if upstream.host:
        _check_transport(section, "host", f"smtp:{upstream.host}")
    if upstream.username and not upstream.password_file:
        raise section.error("password_file", "is required when username is set")
    section.done()
    if any(r.transport == "relay" for r in routes) and not upstream.host:
        raise ConfigError(source, "upstream.host", "is required: a route uses the relay transport")

    section = root.sub("delivery")
    schedule_raw = section.take("retry_schedule", list, [480])
    schedule = []
    for item in schedule_raw:
        parsed = _parse_duration(item)
        if parsed is None or parsed <= 0:
            raise section.error("retry_schedule", f"{item!r} is not a positive duration")
        schedule.append(parsed)
    if not schedule:
        raise section.error("retry_schedule", "must list at least one interval")
    delivery = DeliveryConfig(
        concurrency=section.positive("concurrency", 25),
        per_destination=section.positive("per_destination", 20),
        retry_schedule=tuple(schedule),
        max_attempts=section.positive("max_attempts", 16),
        queue_scan_interval=section.duration("queue_scan_interval", 15),
        connect_timeout=section.duration("connect_timeout", 30),
        command_timeout=section.duration("command_timeout", 300),
    )
    section.done()

    section = root.sub("dns")
    from gateway.filters._dnsquery import parse_nameserver

    nameservers = section.strings("nameservers")
    for server in nameservers:
        try:
            parse_nameserver(server)
        except ValueError:
            raise section.error(
                "nameservers",
                f"{server!r} is not a name server address"
                ' (write "192.0.2.53", "127.0.0.1:5353" or "[::1]:53")',
            ) from None
    dns = DnsConfig(
        nameservers=nameservers,
        timeout=section.duration("timeout", 5),
        threads=section.positive("threads", 8),
    )
    section.done()
    filters = _filters(root.sub("filters"))
    quarantine = _quarantine(root.sub("quarantine"))
    content = ContentLimits.from_section(root.sub("content"))
    from gateway.fetch.accounts import parse_fetch  # it reads Section: imported here, not above

    fetch = parse_fetch(root.sub("fetch"), base)
    root.done()

    return Config(
        source,
        gateway,
        smtp,
        tls,
        auth,
        relay,
        tuple(routes),
        upstream,
        delivery,
        dns,
        filters,
        quarantine,
        content,
        fetch,
    )


def _no_fetch() -> FetchConfig:
    from gateway.fetch.accounts import FetchConfig

    return FetchConfig()


def _quarantine(section: Section) -> QuarantineConfig:
    notice_time = section.take("notice_time", str, "08:00")
    if notice_time and not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", notice_time):
        raise section.error(
            "notice_time", f'{notice_time!r} is not a time of day (write "08:00", or "" for none)'
        )
    quarantine = QuarantineConfig(
        retention=section.positive_duration("retention", 30 * 86400),
        notice_time=notice_time,
        notice_to=section.take("notice_to", str, ""),
        keep_rejected=section.take("keep_rejected", bool, False),
    )
    if quarantine.notice_to and "@" not in quarantine.notice_to:
        raise section.error("notice_to", f"{quarantine.notice_to!r} is not a mail address (user@domain)")
    section.done()
    return quarantine


def _filters(section: Section) -> FiltersConfig:
    defaults = FiltersConfig()
    chains = {}
    for direction in ("inbound", "outbound", "fetched"):
        names = section.strings(direction, getattr(defaults, direction))
        seen = set()
        for name in names:
            if name in seen:
                raise section.error(direction, f"filter {name!r} is listed twice")
            seen.add(name)
        chains[direction] = names
    timeout = section.duration("timeout", defaults.timeout)
    on_failure = section.choice("on_failure", FAILURE_ACTIONS, defaults.on_failure)
    headers = section.take("headers", bool, defaults.headers)
    options = {}
    for name in list(section.table):
        if isinstance(section.table[name], dict):
            options[name] = section.table.pop(name)
    section.done()
    return FiltersConfig(
        chains["inbound"],
        chains["outbound"],
        chains["fetched"],
        timeout,
        on_failure,
        headers,
        options,
        section.text,
    )


def load(path: str | None) -> Config:
    """Read the file at `path`, or the embedded defaults when `path` is None."""
    if path is None:
        return parse(EMBEDDED_DEFAULTS, "<embedded defaults>")
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        raise ConfigError(path, "", f"cannot read the configuration: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "", "the configuration is not UTF-8 text") from None
    return parse(text, path, base_dir=os.path.dirname(os.path.abspath(path)))


def non_defaults(config: Config) -> list[tuple[str, object]]:
    """(key, value) for every setting that differs from its default, like `postconf -n`."""
    defaults = parse("", "<defaults>", base_dir="/")
    found: list[tuple[str, object]] = []
    for name in (
        "gateway",
        "smtp",
        "tls",
        "auth",
        "relay",
        "upstream",
        "delivery",
        "dns",
        "filters",
        "quarantine",
    ):
        ours, theirs = getattr(config, name), getattr(defaults, name)
        for field in attrs.fields(type(ours)):
            value = getattr(ours, field.name)
            if field.name in ("options", "text"):
                continue
            if value != getattr(theirs, field.name):
                found.append((f"{name}.{field.name}", _show(value)))
    for name, table in config.filters.options.items():
        for key, value in table.items():
            found.append((f"filters.{name}.{key}", _show(value)))
    for number, route in enumerate(config.routes):
        found.append((f"routes[{number}]", f"{route.match} -> {route.transport} (tls {route.tls})"))
    for number, account in enumerate(config.fetch.accounts):
        found.append(
            (
                f"fetch.accounts[{number}]",
                f"{account.name}: {account.protocol} {account.username}@{account.server}",
            )
        )
    return found


def _show(value: object) -> object:
    if isinstance(value, tuple):
        return [_show(v) for v in value]
    if isinstance(value, Role):
        return value.value
    if isinstance(value, ListenerConfig):
        return f"{value.endpoint} ({value.role.value})"
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return str(value)
    return value
