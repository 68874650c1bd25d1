"""Building transports for routes, and sending bounces: the delivery side's wiring.

One `Transports` object per gateway owns what transports share (the outbound
connection cache, the DNS resolver and its thread pool) and makes one transport
object per route, on first use.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from gateway.config import Config, ConfigError
from gateway.delivery.connections import ConnectionCache, Dialer
from gateway.delivery.lmtp import LmtpTransport
from gateway.delivery.maildir import MaildirTransport
from gateway.delivery.resolver import DnsResolver
from gateway.delivery.router import Route
from gateway.delivery.smtp import MxTransport, RelayTransport, SmtpTransport
from gateway.delivery.tls import ClientTls
from gateway.interfaces import ISpool, ITransport
from gateway.model import Envelope, QueuedMessage, Recipient, RecipientState, Role, Session
from gateway.smtp.client import AuthCredentials, ClientSettings, TlsPolicy

log = Logger(namespace="mailgate.bounce")


class ThreadPoolService(Service):
    """A dedicated, bounded thread pool started and stopped with the gateway."""

    def __init__(self, name: str, size: int) -> None:
        self.pool = ThreadPool(minthreads=0, maxthreads=size, name=name)

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


def upstream_credentials(cfg: Config) -> AuthCredentials | None:
    """The smart host's user and password (the first line of its password file)."""
    if not cfg.upstream.username:
        return None
    try:
        with open(cfg.upstream.password_file, encoding="utf-8") as handle:
            password = handle.readline().rstrip("\r\n")
    except OSError as error:
        raise ConfigError(
            cfg.source, "upstream.password_file", f"cannot read {error.filename}: {error.strerror}"
        ) from None
    if not password:
        raise ConfigError(cfg.source, "upstream.password_file", f"{cfg.upstream.password_file} is empty")
    return AuthCredentials(cfg.upstream.username, password)


class Transports(MultiService):
    """Makes and keeps the transports; composes and enqueues bounces."""

    def __init__(self, cfg: Config, reactor: Any, spool: ISpool | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.reactor = reactor
        self.spool = spool
        self._made: dict[Route, ITransport] = {}
        # local disk writes (maildir) get their own small pool, never the reactor's
        self.disk = ThreadPoolService("maildir", 4)
        self.disk.setServiceParent(self)
        delivery = cfg.delivery
        settings = ClientSettings(
            cfg.gateway.hostname,
            connect_timeout=delivery.connect_timeout,
            helo_timeout=delivery.command_timeout,
            mail_timeout=delivery.command_timeout,
            rcpt_timeout=delivery.command_timeout,
        )
        self.resolver = DnsResolver(reactor, cfg.dns.nameservers or None, cfg.dns.timeout, cfg.dns.threads)
        self.resolver.setServiceParent(self)
        self.dialer = Dialer(reactor, settings, ConnectionCache(reactor), ClientTls(cfg.tls.ca_file))
        self.upstream: ITransport | None = None
        if cfg.upstream.host:
            self.upstream = SmtpTransport(
                f"smtp:{cfg.upstream.host}",
                self.dialer,
                self.resolver,
                tls=TlsPolicy(cfg.upstream.tls),
                credentials=upstream_credentials(cfg),
            )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self.dialer.close())

    def for_route(self, route: Route) -> ITransport:
        transport = self._made.get(route)
        if transport is None:
            transport = self._made[route] = self._make(route)
        return transport

    def _make(self, route: Route) -> ITransport:
        spec = route.spec
        if spec.kind == "maildir":
            return MaildirTransport(spec.path, reactor=self.reactor, threadpool=self.disk.pool)
        if spec.kind == "lmtp":
            return LmtpTransport(spec, self.dialer, self.resolver)
        if spec.kind == "relay":
            assert self.upstream is not None  # the config requires upstream.host for it
            return self.upstream
        tls = TlsPolicy(route.tls)
        if spec.kind == "smtp":
            return SmtpTransport(spec, self.dialer, self.resolver, tls=tls)
        direct = MxTransport(self.dialer, self.resolver, tls=tls)
        if self.upstream is None or self.cfg.upstream.mode == "never":
            return direct
        return RelayTransport(direct, self.upstream, self.cfg.upstream.mode)

    def bounce(self, message: QueuedMessage, failed: list[RecipientState]) -> Deferred[object]:
        """Send the sender one RFC 3464 report for `failed`, unless the rules say no."""
        from gateway.delivery.bounce import compose_bounce, needs_bounce

        envelope = message.envelope
        due = [state for state in failed if needs_bounce(envelope, state.recipient)]
        if not due:
            if envelope.mail_from == "":
                log.info("{queue_id}: no bounce to the null sender", queue_id=message.queue_id)
            return succeed(None)
        assert self.spool is not None
        report = compose_bounce(
            hostname=self.cfg.gateway.hostname,
            message=message,
            failed=due,
            original_path=self.spool.message_path(message.queue_id),
            now=time.time(),
        )
        incoming = self.spool.new_message()
        incoming.write(report)
        session = Session("127.0.0.1", listener="bounce", role=Role.SUBMISSION, may_relay=True)
        committed: Deferred[str] = incoming.commit(Envelope("", (Recipient(envelope.mail_from),)), session)

        def sent(bounce_id: str) -> None:
            log.info(
                "{queue_id}: sender non-delivery notification: {bounce_id}",
                queue_id=message.queue_id,
                bounce_id=bounce_id,
            )

        return committed.addCallback(sent)
