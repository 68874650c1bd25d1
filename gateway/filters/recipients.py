"""The "recipients" filter: refuse mail for users our domains do not have.

Inbound only, at RCPT, for recipients of ``relay.domains`` (relay control has
already refused the others). How it knows who exists (option ``mode``):

- ``callout`` (the default): ask the internal server, the way Postfix's
  ``reject_unverified_recipient`` does: ``MAIL FROM:<>``, ``RCPT TO:<address>``
  to the first host of the recipient domain's smtp or lmtp route (or
  ``server``). Answers are cached (a day for valid, an hour for unknown); a
  callout that fails or takes longer than ``wait`` answers 450 4.1.1, never a 5xx;
- ``static``: ``addresses`` in the config and ``files`` of them (reloadable);
- ``accept-all``: every recipient of our domains exists.

An unknown recipient gets ``550 5.1.1 <address>: Recipient address rejected:
User unknown`` (the SMTP server counts 5.1.1 refusals against directory
harvesting); or, with ``catch_all`` set, its mail is redirected to that mailbox
(the original recipient stays in the log and in the DSN ORCPT): nothing for an
unknown user is lost.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from gateway.config import RelayConfig, Section
from gateway.delivery.router import Router, TransportSpecError, parse_host_port, parse_transport
from gateway.filters import FilterServices, Request
from gateway.filters._callout import CalloutServer, Connector, Prober, SmtpProber, endpoint_connector
from gateway.filters._directory import (
    AcceptAll,
    Answer,
    Lookup,
    RecipientDirectory,
    RecipientList,
    parse_entry,
)
from gateway.filters._listfile import domain_key
from gateway.filters._verify_cache import AddressVerifier
from gateway.interfaces import IFilter, IReloadable
from gateway.model import CONTINUE, Action, Direction, Stage, Verdict

log = Logger(namespace="mailgate.filter.recipients")

MODES = ("callout", "static", "accept-all")
# every option but mode and catch_all, with its default; each belongs to one mode
_STATIC: dict[str, Any] = {"addresses": (), "files": ()}
_CALLOUT: dict[str, Any] = {
    "server": "",
    "connect_timeout": 5.0,
    "reply_timeout": 10.0,
    "wait": 8.0,
    "positive_ttl": 86400.0,  # a day, where Postfix keeps a valid address 31 days
    "negative_ttl": 3600.0,  # an hour: a user created now gets mail within the hour
    "cache_size": 100_000,
    "concurrency": 4,
    "keep_open": 5.0,
}


class CalloutDirectory:
    """Asks the internal server of each recipient domain, through an `AddressVerifier`."""

    def __init__(
        self,
        services: FilterServices,
        make_prober: Callable[[CalloutServer], Prober],
        *,
        server: CalloutServer | None = None,
        **verifier_options: Any,
    ) -> None:
        self.router = Router(services.config.routes)
        self.server = server
        self.make_prober = make_prober
        self.probers: dict[CalloutServer, Prober] = {}
        self.verifier = AddressVerifier(services.reactor, self._probe, **verifier_options)
        self._warned: set[str] = set()

    def server_for(self, address: str) -> CalloutServer | None:
        if self.server is not None:
            return self.server
        return CalloutServer.from_spec(self.router.route(address).spec)

    def lookup(self, address: str) -> Lookup | Deferred[Lookup]:
        if self.server_for(address) is None:
            return self._unaskable(address)
        return self.verifier.verify(address)

    def _unaskable(self, address: str) -> Lookup:
        # a "*.domain" of ours that leaves by mx or maildir: accepted, as without this filter
        route = self.router.route(address)
        if route.match not in self._warned:
            self._warned.add(route.match)
            log.warn(
                "recipients: mail for {match} is not verified: its route {spec} has no server to ask "
                "(set filters.recipients.server, or use mode static)",
                match=route.match,
                spec=route.spec.text,
            )
        return Lookup(Answer.VALID, f"not verified: route {route.spec.text}")

    def _probe(self, address: str) -> Deferred[Lookup]:
        server = self.server_for(address)
        assert server is not None  # lookup() asks only about addresses with a server
        prober = self.probers.get(server)
        if prober is None:
            prober = self.probers[server] = self.make_prober(server)
        return prober.probe(address)

    def reload(self) -> None:
        """Forget cached "unknown" answers: the users may have been created since."""
        gone = self.verifier.forget_unknown()
        log.info("recipients: reload: forgot {count} cached unknown address(es)", count=gone)


@implementer(IFilter, IReloadable)
class Recipients:
    """Recipient validation for inbound mail (see the module docstring)."""

    name = "recipients"
    stages = frozenset({Stage.RCPT})

    def __init__(self, directory: RecipientDirectory, relay: RelayConfig, catch_all: str = "") -> None:
        self.directory = directory
        self.relay = relay
        self.catch_all = catch_all

    def check(self, request: Request) -> Verdict | Deferred[Verdict]:
        recipient = request.recipient
        if request.direction is not Direction.INBOUND or recipient is None:
            return CONTINUE
        address = recipient.address
        local, at, domain = address.rpartition("@")
        if not at or not local or not self.relay.accepts_domain(domain):
            return CONTINUE  # not ours to judge: relay control decides about other domains
        found = self.directory.lookup(address)
        if isinstance(found, Deferred):
            return found.addCallback(self.verdict, address)
        return self.verdict(found, address)

    def verdict(self, lookup: Lookup, address: str) -> Verdict:
        if lookup.answer is Answer.VALID:
            return CONTINUE
        if lookup.answer is Answer.UNVERIFIED:
            # what went wrong inside stays in our log; the client only hears "later"
            return Verdict.defer(
                f"<{address}>: Recipient address verification in progress, try again later", 450, "4.1.1"
            )
        if self.catch_all:
            return Verdict(
                Action.REDIRECT,
                f"unknown recipient <{address}> redirected to the catch-all <{self.catch_all}> "
                f"({lookup.detail})",
                target=self.catch_all,
            )
        return Verdict.reject(f"<{address}>: Recipient address rejected: User unknown", 550, "5.1.1")

    def reload(self) -> None:
        self.directory.reload()

    @classmethod
    def from_config(cls, options: Section, services: FilterServices) -> Recipients:
        mode = options.choice("mode", MODES, "callout")
        catch_all = options.take("catch_all", str, "")
        values: dict[str, Any] = {
            "addresses": options.strings("addresses"),
            "files": options.strings("files"),
            "server": options.take("server", str, ""),
            "cache_size": options.positive("cache_size", _CALLOUT["cache_size"]),
            "concurrency": options.positive("concurrency", _CALLOUT["concurrency"]),
        }
        for key in ("connect_timeout", "reply_timeout", "wait", "positive_ttl", "negative_ttl", "keep_open"):
            values[key] = options.duration(key, _CALLOUT[key])
        # an option of another mode, changed from its default, is a mistake worth saying
        for keys, its_mode in ((_STATIC, "static"), (_CALLOUT, "callout")):
            for key, default in keys.items():
                if mode != its_mode and values[key] != default:
                    raise options.error(key, f'is only used with mode = "{its_mode}" (mode is "{mode}")')
        if catch_all:
            _check_catch_all(options, catch_all, mode)

        config = services.config
        directory: RecipientDirectory
        if mode == "accept-all":
            directory = AcceptAll()
        elif mode == "static":
            directory = _static(options, values["addresses"], values["files"], config.source)
        else:
            directory = _callouts(options, services, values)
        return cls(directory, config.relay, catch_all)


def _callouts(options: Section, services: FilterServices, values: dict[str, Any]) -> CalloutDirectory:
    server = _server(options, values["server"]) if values["server"] else None
    if server is None:
        _check_routes(options, services)
    connect: Connector | None = None

    def make_prober(target: CalloutServer) -> SmtpProber:
        nonlocal connect
        if connect is None:  # built on first use: checking a config needs no reactor
            connect = endpoint_connector(services.reactor, values["connect_timeout"])
        return SmtpProber(
            target,
            services.reactor,
            connect,
            helo_name=services.hostname,
            reply_timeout=values["reply_timeout"],
            keep_open=values["keep_open"],
            concurrency=values["concurrency"],
        )

    return CalloutDirectory(
        services,
        make_prober,
        server=server,
        positive_ttl=values["positive_ttl"],
        negative_ttl=values["negative_ttl"],
        size=values["cache_size"],
        wait=values["wait"],
    )


def _check_catch_all(options: Section, catch_all: str, mode: str) -> None:
    if mode == "accept-all":
        raise options.error(
            "catch_all",
            'has no effect with mode = "accept-all" (every recipient is valid); '
            'use mode "static" or "callout" to send unknown users to it',
        )
    local, at, domain = catch_all.rpartition("@")
    if not at or not local or domain_key(domain) is None or any(c in catch_all for c in "<> \t\r\n"):
        raise options.error("catch_all", f"{catch_all!r} is not an address (like postmaster@example.com)")


def _static(
    options: Section, addresses: tuple[str, ...], files: tuple[str, ...], source: str
) -> RecipientList:
    if not addresses and not files:
        raise options.error(
            "mode", 'static needs addresses or files (or use mode "callout" to ask the internal server)'
        )
    for text in addresses:
        try:
            parse_entry(text)
        except ValueError as error:
            raise options.error("addresses", str(error)) from None
    base = os.path.dirname(os.path.abspath(source)) if os.path.isfile(source) else os.getcwd()
    paths = tuple(os.path.normpath(os.path.join(base, path)) for path in files)
    return RecipientList(addresses, paths, source)  # a bad file raises ConfigError naming it


def _server(options: Section, text: str) -> CalloutServer:
    """``[host]:port`` (SMTP), or a transport spec: ``smtp:[host]:port``, ``lmtp:...``."""
    try:
        if text.startswith(("smtp:", "lmtp:")):
            server = CalloutServer.from_spec(parse_transport(text))
        else:
            first = parse_host_port(text, 25)
            server = CalloutServer(first.host, first.port)
    except TransportSpecError as error:
        raise options.error("server", str(error)) from None
    assert server is not None  # smtp: and lmtp: specs always name a host or socket
    return server


def _check_routes(options: Section, services: FilterServices) -> None:
    """Each of our domains needs a route with a server to ask (a wildcard is checked when used)."""
    router = Router(services.config.routes)
    for domain in services.config.relay.domains:
        if domain.startswith("*"):
            continue
        route = router.route(f"postmaster@{domain}")
        if CalloutServer.from_spec(route.spec) is None:
            raise options.error(
                "mode",
                f"callout needs a server to ask about {domain}, but its route is {route.spec.text!r}; "
                'set server = "[host]:port", or use mode "static"',
            )
