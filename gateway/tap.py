"""The composition root: `twistd mailgate` options and the service tree.

This is the only place that reads the whole configuration, builds every
component with its slice of it, and touches the reactor.
"""

from __future__ import annotations

import grp
import os
import pwd
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IServiceCollection, MultiService, Service
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXServerEndpoint, serverFromString
from twisted.logger import Logger
from twisted.python import usage

from gateway import collector
from gateway import config as configuration
from gateway.admin.control import ControlFactory
from gateway.certificates import server_context
from gateway.delivery.manager import QueueManager
from gateway.delivery.router import Router
from gateway.delivery.transports import ThreadPoolService, Transports
from gateway.filters.anvil import AnvilServer, anvil_socket_path, process_anvil
from gateway.filters.chain import add_counters
from gateway.filters.reload import SighupReload, reloader
from gateway.quarantine import QuarantineRoom
from gateway.quarantine.outbox import SpoolOutbox
from gateway.quarantine.service import QuarantineService
from gateway.queue.spool import DirectorySpool
from gateway.reception import Reception
from gateway.smtp.auth import CredentialsError, FileCredentials
from gateway.smtp.server import SmtpServerFactory
from gateway.smtp.workers import SmtpWorkers

log = Logger(namespace="mailgate")


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Run the MailGate mail gateway. Without --config it runs on its embedded defaults: "
        "SMTP on 127.0.0.1:2525, state under ./mailgate-state, mail for example.com into "
        "./mailgate-state/mail/."
    )
    optParameters = [["config", "c", None, "The configuration file (TOML)."]]

    def postOptions(self) -> None:
        try:
            self["loaded"] = configuration.load(self["config"])
        except configuration.ConfigError as error:
            raise usage.UsageError(str(error)) from None


class GatewayService(MultiService):
    """The top of the tree: binds as root, then drops privileges, then starts."""

    def __init__(self, cfg: configuration.Config) -> None:
        super().__init__()
        self.cfg = cfg

    def privilegedStartService(self) -> None:
        raise_open_files_limit(self.cfg.gateway.max_open_files)
        for child in self:
            if isinstance(child, SpoolRecovery):
                child.recover()  # first: it may create the spool, which the user is then given
        account = None
        if os.getuid() == 0 and self.cfg.gateway.user:
            account = hand_over_state(self.cfg)
            for child in self:
                if isinstance(child, SmtpWorkers):
                    child.drop_privileges = True
                elif isinstance(child, AnvilServer):
                    child.owner = (account.uid, account.gid)  # the workers connect as the user
        # binds the listeners and the control socket, starts the SMTP workers (which
        # become the user themselves: the interpreter may be where only root can read)
        super().privilegedStartService()
        if account is not None:
            os.chown(self.cfg.control_socket, account.uid, account.gid)
            become(account)

    def startService(self) -> None:
        super().startService()
        collector.settle()
        log.info(
            "mailgate started: {hostname}, state in {state}, {listeners} SMTP listener(s)",
            hostname=self.cfg.gateway.hostname,
            state=self.cfg.gateway.state_dir,
            listeners=len(self.cfg.smtp.listeners),
        )


def raise_open_files_limit(wanted: int) -> None:
    """One file descriptor per SMTP session: raise the soft (and if root, hard) limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    log.info("open files limit raised to {limit}", limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0])


@attrs.frozen
class Account:
    name: str
    uid: int
    gid: int


def account_of(cfg: configuration.Config) -> Account:
    """The user and group the gateway runs as (`gateway.user`, `gateway.group`)."""
    try:
        user = pwd.getpwnam(cfg.gateway.user)
        gid = grp.getgrnam(cfg.gateway.group).gr_gid if cfg.gateway.group else user.pw_gid
    except KeyError as error:
        raise SystemExit(f"mailgate: gateway.user/group: no such user or group: {error.args[0]}") from None
    return Account(user.pw_name, user.pw_uid, gid)


def hand_over_state(cfg: configuration.Config) -> Account:
    """Check the user can reach the state directory, and give it everything in it."""
    account = account_of(cfg)
    blocked = unreachable_parent(cfg.gateway.state_dir, account.uid, account.gid)
    if blocked:
        raise SystemExit(
            f"mailgate: gateway.user {account.name} cannot reach gateway.state_dir {cfg.gateway.state_dir}: "
            f"{blocked} is not searchable by it; choose a state_dir under a directory it can enter "
            '(like /var/lib/mailgate), or set gateway.user = "" to keep running as root'
        )
    for top, dirs, files in os.walk(cfg.gateway.state_dir):
        for name in [top, *(os.path.join(top, d) for d in dirs), *(os.path.join(top, f) for f in files)]:
            st = os.lstat(name)
            if st.st_uid != account.uid or st.st_gid != account.gid:
                os.lchown(name, account.uid, account.gid)
    return account


def become(account: Account) -> None:
    """Drop root for good."""
    os.initgroups(account.name, account.gid)
    os.setgid(account.gid)
    os.setuid(account.uid)
    log.info("running as {user} (uid {uid})", user=account.name, uid=account.uid)


def unreachable_parent(path: str, uid: int, gid: int) -> str | None:
    """The first directory above `path` that `uid`/`gid` may not enter, if any."""
    parent = os.path.dirname(os.path.abspath(path))
    chain = []
    while True:
        chain.append(parent)
        if parent == os.path.dirname(parent):
            break
        parent = os.path.dirname(parent)
    for directory in reversed(chain):
        st = os.stat(directory)
        if st.st_uid == uid:
            bit = 0o100
        elif st.st_gid == gid:
            bit = 0o010
        else:
            bit = 0o001
        if not st.st_mode & bit:
            return directory
    return None


def smtp_factory_maker(
    cfg: configuration.Config, reception: Reception, reactor: Any
) -> tuple[Callable[[configuration.ListenerConfig], SmtpServerFactory], list[Service]]:
    """What every SMTP listener shares (TLS context, credentials), and a factory per listener.

    Returns the factory maker and the services (thread pools) the caller must run.
    """
    tls_context = server_context(cfg.tls, cfg.gateway.hostname, cfg.gateway.state_dir)
    credentials = None
    services: list[Service] = []
    if cfg.auth.credentials_file:
        # password hashes are slow on purpose: they get their own small pool
        hashing = ThreadPoolService("auth", 2)
        services.append(hashing)
        try:
            credentials = FileCredentials.from_file(
                cfg.auth.credentials_file, reactor=reactor, threadpool=hashing.pool
            )
        except OSError as error:
            raise configuration.ConfigError(
                cfg.source, "auth.credentials_file", f"cannot read {error.filename}: {error.strerror}"
            ) from None
        except CredentialsError as error:
            raise configuration.ConfigError(cfg.source, "auth.credentials_file", str(error)) from None

    def make_factory(listener: configuration.ListenerConfig) -> SmtpServerFactory:
        return SmtpServerFactory.from_config(
            cfg, listener, reception, tls_context=tls_context, credentials=credentials, reactor=reactor
        )

    return make_factory, services


def make_reception(
    cfg: configuration.Config, spool: Any, reactor: Any, services: Any = None, dns: Any = None
) -> Reception:
    """The reception with the configured filter chains (raises ConfigError for a bad chain)."""
    from gateway.content import ContentReader
    from gateway.filters import FilterServices
    from gateway.filters.registry import build_runner
    from gateway.quarantine.outbox import SpoolOutbox

    if services is None:
        outbox = SpoolOutbox(spool, cfg.gateway.hostname, cfg.postmaster)
        services = FilterServices(cfg, reactor, outbox=outbox, dns=dns)
    runner = build_runner(cfg, services)
    reader = ContentReader(reactor, cfg.content)
    return Reception(
        spool,
        cfg.relay,
        runner,
        headers=cfg.filters.headers,
        content=lambda message: reader.content(message.size, message.open),
        keep_rejected=cfg.quarantine.keep_rejected,
        fetched_refusal=cfg.fetch.on_refusal,
    )


def make_service(
    cfg: configuration.Config, reactor: Any = global_reactor, config_path: str | None = None
) -> MultiService:
    """Build the whole gateway from its configuration (read from `config_path`)."""
    os.makedirs(cfg.gateway.state_dir, mode=0o750, exist_ok=True)
    top = GatewayService(cfg)

    # the spool is stopped by SpoolRecovery, the first child: after everything that uses it
    spool = DirectorySpool(
        cfg.spool_dir, reactor=reactor, hash_levels=cfg.gateway.hash_levels, stop_with_reactor=False
    )
    transports = Transports(cfg, reactor)
    manager = QueueManager(
        spool,
        Router(cfg.routes),
        transports.for_route,
        transports.bounce,
        cfg.delivery,
        reactor,
    )
    transports.spool = spool
    from gateway.filters import FilterServices

    filter_services = FilterServices(
        cfg, reactor, outbox=SpoolOutbox(spool, cfg.gateway.hostname, cfg.postmaster)
    )
    reception = make_reception(cfg, spool, reactor, filter_services)
    spool.subscribe(manager.wake)
    SpoolRecovery(spool, manager.scan).setServiceParent(top)  # first started, last stopped
    transports.setServiceParent(top)
    manager.setServiceParent(top)

    etrn_listeners: list[Callable[[str], object]] = []  # the fetchers' "poll now" (issue 5)

    def etrn(domain: str) -> None:
        """ETRN <domain>: its deferred mail now, and its fetch accounts polled."""
        woken = manager.flush_domain(domain)
        log.info("etrn: {domain}: {count} deferred message(s) to deliver now", domain=domain, count=woken)
        for listener in etrn_listeners:
            listener(domain)

    reception.etrn = etrn
    workers = None
    if cfg.smtp.workers and cfg.smtp.listeners:
        # the listeners are served by worker processes; this one delivers. Check what
        # they will load (and make the self-signed certificate) once, here, first.
        smtp_factory_maker(cfg, reception, reactor)
        # the workers count sessions per client in this process's anvil ("limits"):
        # its socket is bound before they start (the children start in order)
        if cfg.smtp.workers > 1:  # one worker keeps its own (gateway.filters.anvil.connect_anvil)
            AnvilServer(anvil_socket_path(cfg), process_anvil(reactor), reactor).setServiceParent(top)
        workers = SmtpWorkers(
            cfg.smtp.workers,
            config_path,
            [lst.endpoint for lst in cfg.smtp.listeners],
            manager.wake,
            reactor,
            on_etrn=etrn,
            dns=lambda: filter_services.dns,  # the workers' DNS questions are asked here (one cache)
        )
        workers.setServiceParent(top)
    else:
        make_factory, services = smtp_factory_maker(cfg, reception, reactor)
        for service in services:
            service.setServiceParent(top)
        for listener in cfg.smtp.listeners:
            endpoint = serverFromString(reactor, listener.endpoint)
            port = StreamServerEndpointService(endpoint, make_factory(listener))
            port._raiseSynchronously = True  # a port in use stops start-up with a clear error
            port.setServiceParent(top)

    reload = reloader(reception.runner, workers)

    def counters() -> dict[str, Any]:
        """The filters' counters of this process and (as last reported) of the SMTP workers."""
        total: dict[str, Any] = {}
        add_counters(total, reception.runner.snapshot())
        for report in workers.filter_counters.values() if workers is not None else ():
            add_counters(total, report)
        return total

    SighupReload(reactor, reload).setServiceParent(top)  # installs at start, restores at stop
    fetch = None
    if cfg.fetch.accounts:
        from gateway.fetch.accounts import read_passwords
        from gateway.fetch.poller import FetchService
        from gateway.state import open_store

        fetch = FetchService(
            read_passwords(cfg.fetch, cfg.source),  # as root, before privileges drop
            reception,
            open_store(cfg, reactor),
            reactor,
            hostname=cfg.gateway.hostname,
            postmaster=cfg.postmaster,
        )
        fetch.setServiceParent(top)
        etrn_listeners.append(fetch.poll_domain)

    room = QuarantineRoom(
        spool, manager, retention=cfg.quarantine.retention, trainer=bayes_trainer(cfg, reactor)
    )
    QuarantineService(
        room,
        SpoolOutbox(spool, cfg.gateway.hostname, cfg.postmaster),
        cfg.gateway.hostname,
        notice_time=cfg.quarantine.notice_time,
        notice_to=cfg.quarantine.notice_to,
        clock=reactor,
    ).setServiceParent(top)
    control = StreamServerEndpointService(
        UNIXServerEndpoint(reactor, cfg.control_socket, mode=0o600, wantPID=True),
        ControlFactory(
            manager,
            spool,
            time.time(),
            reload=reload,
            filter_counters=counters,
            quarantine=room,
            fetch=fetch,
            dns=filter_services.dns_stats,
        ),
    )
    control._raiseSynchronously = True
    control.setServiceParent(top)
    return top


def quarantine_trainer(cfg: configuration.Config, reactor: Any, reception: Reception) -> Any:
    """What quarantine train-spam/train-ham teach: Bayes (required), spamd's TELL (best effort)."""
    from gateway.filters.spamassassin import SpamAssassin
    from gateway.quarantine.training import QuarantineTrainer, spamd_learner

    bayes = bayes_trainer(cfg, reactor)
    if bayes is None:
        return None  # "no Bayes classifier to train"
    spamd = [
        (f"spamassassin ({f.name})", spamd_learner(f.client))
        for f in reception.runner.all_filters()
        if isinstance(f, SpamAssassin)
    ]
    return QuarantineTrainer([bayes], spamd)


def bayes_trainer(cfg: configuration.Config, reactor: Any) -> Callable[[bytes, bool], Deferred[Any]] | None:
    """Training from the quarantine, when a chain uses the Bayes classifier."""
    chained = {
        name for direction in ("inbound", "outbound", "fetched") for name in getattr(cfg.filters, direction)
    }
    kinds = {cfg.filters.options.get(name, {}).get("filter", name) for name in chained}
    if "bayes" not in kinds:
        return None
    from gateway.bayes.cli import subject_prefix
    from gateway.bayes.store import open_token_store
    from gateway.bayes.training import Trainer

    trainer = Trainer(open_token_store(cfg, reactor), subject_prefix=subject_prefix(cfg))
    return trainer.train


class SpoolRecovery(Service):
    """On start: clean half-written files and requeue what was active at a crash.

    On stop (last, as the first child): finish the spool's pending writes.
    """

    def __init__(self, spool: DirectorySpool, then: Callable[[], None]) -> None:
        self.spool = spool
        self.then = then

    recovered = False

    def privilegedStartService(self) -> None:
        # before the SMTP workers start (they are later children): recovery deletes
        # unfinished files, and a worker's commit in progress must not look like one
        super().privilegedStartService()
        self.recover()

    def startService(self) -> None:
        super().startService()
        self.recover()  # runners without a privileged start
        self.then()

    def recover(self) -> None:
        if not self.recovered:
            count = self.spool.recover_now()
            self.recovered = True
            log.info("spool recovered: {count} message(s) requeued", count=count)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.spool.stop()


def makeService(options: Options) -> IServiceCollection:
    cfg: configuration.Config = options["loaded"]
    try:
        path = options["config"]
        return make_service(cfg, config_path=os.path.abspath(path) if path else None)
    except configuration.ConfigError as error:
        sys.stderr.write(f"mailgate: {error}\n")
        raise SystemExit(1) from None
