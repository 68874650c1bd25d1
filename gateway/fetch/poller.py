"""The poller: every fetch account on its own timer, into the queue.

`FetchService` (a twisted Service) polls each account every `interval`
(the first polls soon after start, spread over the first seconds), with at
most `per_server_sessions` sessions open at once to one server, however many
accounts live there. One poll, per mailbox (the POP3 maildrop, or each IMAP
folder in turn):

1. connect and log in (`connect_pop3` / `connect_imap`);
2. list; forget seen UIDs the server no longer has (`gateway.fetch.seen`);
3. skip what was seen, and what is larger than `max_size` (left on the
   server and reported once); take at most `max_messages`, oldest first;
4. retrieve and queue each in order (`gateway.fetch.intake`); a message
   whose reception answered 250 is recorded as seen; one that got a 4xx is
   left for the next poll;
5. mark for deletion what is durable in our queue (keep = false), or, with
   keep = true and `delete_after`, what was first fetched that long ago; an
   IMAP account with `move_to` moves those messages to that folder instead
   (UID MOVE, at once: they are durable in our queue already);
6. close: the server deletes only now (POP3 QUIT, IMAP EXPUNGE). A poll that
   fails anywhere aborts the session, and nothing is deleted.

IMAP IDLE (`idle = true`): after a successful poll, each folder of the
account is watched by a session of its own in IDLE (RFC 2177). New mail
there (EXISTS) polls that folder, on a separate session as any poll, within
`IDLE_SETTLE` (changes that come together make one poll; a change during a
poll of the account runs another right after it). A watcher, once in IDLE,
polls its folder once too: mail that came between the poll's listing and
the watcher's SELECT is not missed. The timer keeps polling every interval
as a fallback. A watcher that drops is opened again after `IDLE_RETRY`,
doubled per failure up to `MAX_BACKOFF` (reset by an IDLE that lasted
`IDLE_STABLE`); a server without IDLE is logged once and left to the timer.
A watcher holds one of the server's `per_server_sessions` only while it
connects and logs in, not while it waits in IDLE (it sends nothing then):
there is one per folder of each idle account, at most `MAX_IDLE_FOLDERS` per
account (the config's bound). Stopping the service ends each IDLE (DONE,
then LOGOUT; dropped if that takes over `IDLE_STOP`).

A failed poll backs the account off (its interval doubled per failure, up to
30 minutes; back to normal after a success). Three refused logins in a row
log one alert line for the account. `poll_now` starts a poll at once
(`mailgatectl fetch now`, ETRN); one already running is not started twice, the
request runs right after it. `status()` gives each account's counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.fetch import AuthenticationFailed, FetchError, IMailboxSession, MailboxAccount, RemoteMessage
from gateway.fetch._token import fetch_token
from gateway.fetch.accounts import FetchAccount, FetchConfig
from gateway.fetch.intake import Intake, IntakeResult, Retrieved
from gateway.fetch.seen import SeenStore
from gateway.state import IStateStore, StoreError

__all__ = ["ALERT_AFTER", "MAX_BACKOFF", "FetchService", "PollResult", "default_connectors"]

log = Logger(namespace="mailgate.fetch")

MAX_BACKOFF = 30 * 60.0  # a failing account is tried at least this often
ALERT_AFTER = 3  # refused logins in a row before the alert line
FIRST_POLL = 1.0  # seconds after start of the first account's first poll
SPREAD = 30.0  # the first polls of all accounts are spread over at most this
IDLE_SETTLE = 0.25  # seconds from a change seen in IDLE to the poll (EXISTS and RECENT come together)
IDLE_RETRY = 5.0  # seconds before a dropped IDLE watcher is opened again (doubled per failure)
IDLE_STABLE = 60.0  # an IDLE that lasted this long was no failure: the retry delay starts over
IDLE_STOP = 5.0  # seconds DONE and LOGOUT may take when the service stops

Connector = Callable[[MailboxAccount, Any], Deferred[Any]]


def default_connectors() -> dict[str, Connector]:
    """The protocol clients: "pop3", "imap" and "pop2"."""
    from gateway.fetch.imap import connect_imap
    from gateway.fetch.pop2 import connect_pop2
    from gateway.fetch.pop3 import connect_pop3

    return {"pop3": connect_pop3, "imap": connect_imap, "pop2": connect_pop2}


@attrs.frozen
class PollResult:
    """What one poll of an account did."""

    account: str
    messages: int = 0  # queued (or dropped as multidrop duplicates)
    octets: int = 0
    deleted: int = 0  # marked for deletion on the server
    left: int = 0  # refused for now (4xx): left on the server for the next poll
    oversized: int = 0
    error: str | None = None
    moved: int = 0  # moved to the account's move_to folder (IMAP) instead of deleted

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.define
class _Tally:
    """A poll's counts as it goes (kept when it fails half-way)."""

    messages: int = 0
    octets: int = 0
    deleted: int = 0
    left: int = 0
    oversized: int = 0
    moved: int = 0

    def result(self, account: str) -> PollResult:
        return PollResult(
            account, self.messages, self.octets, self.deleted, self.left, self.oversized, moved=self.moved
        )


@attrs.define
class _Counters:
    polls: int = 0
    messages: int = 0
    bytes: int = 0
    errors: int = 0
    last_error: str | None = None
    last_error_time: float | None = None
    last_success: float | None = None


@attrs.define(eq=False)
class _Watcher:
    """One folder of an idle = true account, watched in IDLE between polls."""

    folder: str
    session: Any = None  # the ImapSession in IDLE (None: opening it, waiting to retry, or none)
    opening: Deferred[None] | None = None  # from connecting until its IDLE ends
    retry: IDelayedCall | None = None
    failures: int = 0  # drops in a row (the retry backoff)
    since: float = 0.0  # when its IDLE began
    unsupported: bool = False  # the server has no IDLE: the timer alone polls


@attrs.define(eq=False)
class _AccountState:
    """An account's timer, poll under way, waiting requests, failures and counters."""

    account: FetchAccount
    timer: IDelayedCall | None = None
    running: Deferred[PollResult] | None = None
    waiting: list[Deferred[PollResult]] = attrs.field(factory=list)  # for the poll under way
    again: list[Deferred[PollResult]] = attrs.field(factory=list)  # for a poll right after it
    failures: int = 0  # polls failed in a row (the backoff)
    auth_failures: int = 0  # logins refused in a row
    reported: set[tuple[str, str]] = attrs.field(factory=set)  # (folder, uid) reported oversized
    sessions: set[Any] = attrs.field(factory=set)  # open mailbox sessions (aborted at stop)
    counters: _Counters = attrs.field(factory=_Counters)
    next_poll: float | None = None
    watchers: dict[str, _Watcher] = attrs.field(factory=dict)  # IDLE, by folder
    pending: dict[str, None] = attrs.field(factory=dict)  # folders to poll (an ordered set)
    settle: IDelayedCall | None = None  # the poll of `pending`, soon


class FetchService(Service):
    """Polls the configured accounts into the queue (see the module docstring)."""

    name = "fetch"

    def __init__(
        self,
        config: FetchConfig,
        reception: Any,
        store: IStateStore,
        clock: IReactorTime,
        *,
        hostname: str,
        postmaster: str,
        connect: Mapping[str, Connector] | None = None,
        now: Callable[[], float] | None = None,
    ) -> None:
        """`reception`: the gateway's `Reception` (built with ``fetched_refusal =
        fetch.on_refusal``); `store`: the state store (seen UIDs, duplicates);
        `clock`: the reactor; `postmaster`: where refused and unknown recipients go
        for accounts without their own; `connect`: the protocol clients by name
        (tests give fakes); `now`: wall-clock time for the status (the clock's by default)."""
        missing = [
            account.name for account in config.accounts if not account.password and account.auth != "xoauth2"
        ]
        if missing:  # the composition root reads them (accounts.read_passwords) before building this
            raise ValueError(f"fetch accounts without their password read: {', '.join(missing)}")
        self.config = config
        self.clock = clock
        self.connect = dict(connect) if connect is not None else default_connectors()
        self.intake = Intake(reception, store, clock, hostname, postmaster)
        self.seen = SeenStore(store, clock)
        self.now = now or clock.seconds
        self.accounts = {account.name: _AccountState(account) for account in config.accounts}
        self._servers: dict[str, DeferredSemaphore] = {}
        self._stopping = False

    # -- the service ----------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._stopping = False
        count = len(self.accounts)
        for index, state in enumerate(self.accounts.values()):
            spread = min(SPREAD, state.account.interval) * index / max(1, count)
            self._schedule(state, FIRST_POLL + spread)
        if count:
            log.info("fetch: {count} account(s) to poll", count=count)

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        self._stopping = True
        running: list[Deferred[None]] = []
        watching: list[Deferred[None]] = []
        for state in self.accounts.values():
            for call in (state.timer, state.settle):
                if call is not None and call.active():
                    call.cancel()
            state.timer = state.settle = None
            state.pending.clear()
            for session in list(state.sessions):
                session.abort()  # nothing is deleted on a dropped session
            if state.running is not None:
                running.append(_settled(state.running))
            watching.extend(self._stop_watching(state))
        stopped = DeferredList([*running, *watching]).addCallback(lambda _: None)
        if watching:
            # An IDLE ends within the connection's dataReceived (the server's answer to DONE or
            # LOGOUT); the reactor's shutdown goes on when this fires, dropping every connection
            # at once: not from inside that dataReceived (Twisted's TLS layer breaks on it).
            stopped.addCallback(lambda _: deferLater(self.clock, 0, lambda: None))
        return stopped

    # -- on demand ------------------------------------------------------------------------------------

    def poll_now(self, name: str | None = None) -> Deferred[list[dict[str, Any]]]:
        """Poll one account (or all) at once; fires with each poll's result (`PollResult.as_dict`).

        An account whose poll is under way is polled again right after it.
        An unknown name raises ValueError (the control socket shows it).
        """
        if name is not None and name not in self.accounts:
            raise ValueError(f"no fetch account named {name!r} (see mailgatectl fetch status)")
        if self._stopping:
            raise ValueError("the gateway is stopping")
        states = [self.accounts[name]] if name is not None else list(self.accounts.values())
        asked = [self._request(state) for state in states]
        return gatherResults(asked).addCallback(lambda results: [result.as_dict() for result in results])

    def poll_domain(self, domain: str) -> list[str]:
        """ETRN <domain> (RFC 1985): poll the accounts delivering into `domain`; their names.

        No name back: none delivers there (the SMTP server answers 458). The
        polls run on; their errors are logged and counted as any poll's.
        """
        names = [name for name, state in self.accounts.items() if domain_of_account(state.account, domain)]
        for name in names:
            self.poll_now(name)
        return names

    def status(self) -> dict[str, dict[str, Any]]:
        """Each account's counters and state, as plain values (for `mailgatectl fetch status`)."""
        report = {}
        for name, state in self.accounts.items():
            account = state.account
            report[name] = {
                "protocol": account.protocol,
                "server": f"{account.server}:{account.port}",
                "username": account.username,
                **attrs.asdict(state.counters),
                "running": state.running is not None,
                "failures_in_a_row": state.failures,
                "next_poll": state.next_poll,
                "idle": sorted(folder for folder, w in state.watchers.items() if w.session is not None),
            }
        return report

    # -- scheduling -----------------------------------------------------------------------------------

    def _schedule(self, state: _AccountState, delay: float) -> None:
        if state.timer is not None and state.timer.active():
            state.timer.cancel()
        state.timer = self.clock.callLater(delay, self._timer_fired, state)
        state.next_poll = self.now() + delay

    def _timer_fired(self, state: _AccountState) -> None:
        state.timer = None
        if state.running is None:
            self._start(state)
        else:  # a poll of some folders (IDLE): all of them right after it
            state.pending.update(dict.fromkeys(self._folders(state.account)))

    def _request(self, state: _AccountState) -> Deferred[PollResult]:
        asked: Deferred[PollResult] = Deferred()
        if state.running is not None:
            state.again.append(asked)
        else:
            state.waiting.append(asked)
            self._start(state)
        return asked

    def _start(self, state: _AccountState, folders: tuple[str, ...] | None = None) -> None:
        """Poll the account: all its folders (the timer's poll, rescheduled after), or some (IDLE)."""
        if folders is None:
            folders = self._folders(state.account)
            if state.timer is not None and state.timer.active():
                state.timer.cancel()
            state.timer = None
            state.next_poll = None
        state.pending.clear()  # the listing comes later: what changed until now is in this poll
        running = Deferred.fromCoroutine(self._poll(state, folders))
        state.running = running
        running.addBoth(self._finished, state)

    @staticmethod
    def _folders(account: FetchAccount) -> tuple[str, ...]:
        return account.folders if account.protocol == "imap" else ("INBOX",)

    def _finished(self, outcome: PollResult | Failure, state: _AccountState) -> None:
        state.running = None
        if isinstance(outcome, Failure):  # a bug: _poll catches what a poll may meet
            log.failure("fetch: {account}: poll failed", outcome, account=state.account.name)
            outcome = PollResult(state.account.name, error=outcome.getErrorMessage())
        waiting, state.waiting = state.waiting, []
        for asked in waiting:
            asked.callback(outcome)
        if self._stopping:
            for asked in state.again:
                asked.callback(PollResult(state.account.name, error="the gateway is stopping"))
            state.again = []
            return
        if state.again:
            state.waiting, state.again = state.again, []
            self._start(state)
            return
        if state.pending and state.settle is None:
            self._start(state, self._pending(state))
            return
        if not self.running:
            return  # polled on demand before the service started: the timers start with it
        if outcome.error is None:
            self._watch(state)
        interval = state.account.interval
        delay = max(interval, min(interval * 2**state.failures, MAX_BACKOFF)) if state.failures else interval
        if state.timer is None or not state.timer.active() or state.failures:
            self._schedule(state, delay)  # (a poll of some folders leaves the timer's poll of all)

    # -- one poll -------------------------------------------------------------------------------------

    async def _poll(self, state: _AccountState, folders: tuple[str, ...]) -> PollResult:
        account = state.account
        state.counters.polls += 1
        tally = _Tally()
        try:
            for folder in folders:
                if self._stopping:
                    break
                await self._folder(state, folder, tally)
        except Exception as error:
            return self._failed(state, tally.result(account.name), error)
        state.failures = 0
        state.auth_failures = 0
        state.counters.last_success = self.now()
        if tally.messages or tally.deleted or tally.left:
            log.info(
                "fetch: {account}: {messages} message(s), {octets} octets queued, {deleted} deleted"
                " on the server, {left} left for later",
                account=account.name,
                messages=tally.messages,
                octets=tally.octets,
                deleted=tally.deleted,
                left=tally.left,
            )
        return tally.result(account.name)

    def _failed(self, state: _AccountState, totals: PollResult, error: Exception) -> PollResult:
        account = state.account
        text = str(error) if isinstance(error, FetchError) else f"{type(error).__name__}: {error}"
        state.failures += 1
        state.counters.errors += 1
        state.counters.last_error = text
        state.counters.last_error_time = self.now()
        if isinstance(error, AuthenticationFailed):
            state.auth_failures += 1
            if state.auth_failures == ALERT_AFTER:
                log.error(
                    "fetch: ALERT: account {account}: authentication failed {count} times",
                    account=account.name,
                    count=ALERT_AFTER,
                )
        else:
            state.auth_failures = 0
        if isinstance(error, (FetchError, StoreError, OSError)):
            log.warn("fetch: {account}: {error}", account=account.name, error=text)
        else:  # a bug
            failure = Failure(error)  # type: ignore[no-untyped-call]
            log.failure("fetch: {account}: poll failed", failure, account=account.name)
        return attrs.evolve(totals, error=text)

    async def _folder(self, state: _AccountState, folder: str, tally: _Tally) -> None:
        account = state.account
        server = self._server(account)
        await server.acquire()
        try:
            mailbox: IMailboxSession = await self._login(account, folder)
            state.sessions.add(mailbox)
            try:
                await self._fetch(state, folder, mailbox, tally)
                await mailbox.close()
            except BaseException:
                mailbox.abort()
                raise
            finally:
                state.sessions.discard(mailbox)
        finally:
            server.release()

    async def _fetch(
        self, state: _AccountState, folder: str, mailbox: IMailboxSession, tally: _Tally
    ) -> None:
        account = state.account
        listed: list[RemoteMessage] = await mailbox.list_messages()
        seen = await self.seen.open(account.name, folder)
        seen.prune(message.uid for message in listed)
        present = {(folder, message.uid) for message in listed}
        state.reported = {key for key in state.reported if key[0] != folder or key in present}
        fresh = [message for message in listed if message.uid not in seen]
        if account.max_size:
            oversized = [message for message in fresh if message.size > account.max_size]
            fresh = [message for message in fresh if message.size <= account.max_size]
            tally.oversized += len(oversized)
            self._report_oversized(state, folder, oversized)
        if account.max_messages:
            fresh = fresh[: account.max_messages]
        # the next message is retrieved while the one before is queued (filters, fsync), and
        # queued only once that one is recorded: a crash leaves at most one message queued but
        # not recorded as seen (fetched twice), never more. POP2 acknowledges each before the next.
        overlap = account.protocol != "pop2"
        pending: tuple[RemoteMessage, Deferred[IntakeResult]] | None = None
        retrieved: Retrieved | None = None
        try:
            for message in fresh:
                if self._stopping:
                    break
                retrieved = await self.intake.retrieve(account, mailbox, message)
                if pending is not None:
                    current, pending = pending, None
                    await self._settle(state, folder, mailbox, seen, tally, *current)
                pending, retrieved = (message, retrieved.queue()), None
                if not overlap:
                    current, pending = pending, None
                    await self._settle(state, folder, mailbox, seen, tally, *current)
            if pending is not None:
                current, pending = pending, None
                await self._settle(state, folder, mailbox, seen, tally, *current)
        except BaseException:
            # the session is lost: a message retrieved but not queued is forgotten (it is still
            # on the server); the one being queued still is, and if it got its 250 it is
            # recorded, so the next poll does not fetch it again
            if retrieved is not None:
                retrieved.forget()
            if pending is not None:
                try:
                    await self._settle(state, folder, mailbox, seen, tally, *pending)
                except Exception:
                    log.failure(
                        "fetch: {account}: {uid}: queuing failed", account=account.name, uid=pending[0].uid
                    )
            raise
        doomed = list(self._to_delete(account, listed, seen))
        if doomed and account.move_to:
            await cast(Any, mailbox).move(doomed, account.move_to)  # ImapSession.move (the config: IMAP)
            tally.moved += len(doomed)
        elif doomed:
            await mailbox.delete(doomed)
            tally.deleted += len(doomed)
        await seen.flush()

    async def _settle(
        self,
        state: _AccountState,
        folder: str,
        mailbox: IMailboxSession,
        seen: Any,
        tally: _Tally,
        message: RemoteMessage,
        queued: Deferred[IntakeResult],
    ) -> None:
        """A retrieved message's queuing is over: record it as seen (250) or leave it (4xx)."""
        account = state.account
        result = await queued
        state.counters.bytes += result.size
        if result.done:
            await seen.record(message.uid)
            if account.protocol == "pop2" and not account.keep:
                # POP2 deletes by ACKD right after the message's RETR: marked now, while it
                # is the one just retrieved, rather than read again at close.
                await mailbox.delete([message])
            state.counters.messages += 1
            tally.messages += 1
            tally.octets += result.size
        else:
            state.counters.errors += 1
            state.counters.last_error = f"{folder} {message.uid}: {result.reply}"
            state.counters.last_error_time = self.now()
            tally.left += 1
            log.warn(
                "fetch: {account}: message {uid} left on the server for the next poll: {reply}",
                account=account.name,
                uid=message.uid,
                reply=result.reply,
            )

    async def _login(self, account: FetchAccount, folder: str) -> Any:
        """A logged-in session; for XOAUTH2 the token command runs first and its token is the password."""
        mailbox = account.mailbox(folder)
        if account.auth == "xoauth2":
            token = await fetch_token(account.token_command, self.clock)
            mailbox = attrs.evolve(mailbox, password=token)
        return await self.connect[account.protocol](mailbox, self.clock)

    def _server(self, account: FetchAccount) -> DeferredSemaphore:
        """The sessions a server may have at once (polls, and IDLE watchers logging in)."""
        return self._servers.setdefault(
            account.server.lower(), DeferredSemaphore(self.config.per_server_sessions)
        )

    # -- IMAP IDLE ------------------------------------------------------------------------------------

    def _watch(self, state: _AccountState) -> None:
        """After a successful poll: each folder of an idle account watched in IDLE, if it is not yet."""
        account = state.account
        if not account.idle or account.protocol != "imap" or self._stopping:
            return
        for folder in account.folders:
            watcher = state.watchers.setdefault(folder, _Watcher(folder))
            idle = watcher.opening is None and watcher.retry is None
            if idle and not watcher.unsupported:
                self._open_watcher(state, watcher)

    def _open_watcher(self, state: _AccountState, watcher: _Watcher) -> None:
        watcher.retry = None
        opening = Deferred.fromCoroutine(self._idle(state, watcher))
        watcher.opening = opening
        opening.addBoth(self._idle_ended, state, watcher)

    async def _idle(self, state: _AccountState, watcher: _Watcher) -> None:
        """Connect, log in and wait in IDLE until the session ends (or the server has no IDLE)."""
        account = state.account
        server = self._server(account)
        await server.acquire()  # counted while it logs in, not while it waits
        try:
            session = await self._login(account, watcher.folder)
        finally:
            server.release()
        if self._stopping:
            await session.close()
            return
        if "IDLE" not in session.capabilities:
            watcher.unsupported = True
            log.warn(
                "fetch: {account}: {server} does not offer IDLE: {folder} is polled every {interval:g} s",
                account=account.name,
                server=account.server,
                folder=watcher.folder,
                interval=account.interval,
            )
            await session.close()
            return
        watcher.session = session
        watcher.since = self.clock.seconds()
        ended = session.idle(lambda: self._changed(state, watcher.folder))
        self._changed(state, watcher.folder)  # what came since the last poll listed the folder
        log.info("fetch: {account}: watching {folder} in IDLE", account=account.name, folder=watcher.folder)
        await ended

    def _idle_ended(self, outcome: Failure | None, state: _AccountState, watcher: _Watcher) -> None:
        session, watcher.session = watcher.session, None
        watcher.opening = None
        if self._stopping or watcher.unsupported:
            return
        if session is not None:
            session.abort()  # whatever ended the IDLE, the connection goes with it
            if self.clock.seconds() - watcher.since >= IDLE_STABLE:
                watcher.failures = 0
        watcher.failures += 1
        delay = min(IDLE_RETRY * 2 ** (watcher.failures - 1), MAX_BACKOFF)
        why = outcome.getErrorMessage() if isinstance(outcome, Failure) else "the server ended it"
        log.warn(
            "fetch: {account}: IDLE on {folder} ended ({error}): opened again in {delay:g} s",
            account=state.account.name,
            folder=watcher.folder,
            error=why,
            delay=delay,
        )
        watcher.retry = self.clock.callLater(delay, self._open_watcher, state, watcher)

    def _changed(self, state: _AccountState, folder: str) -> None:
        """New mail in a watched folder: poll it soon (once for changes that come together)."""
        if self._stopping:
            return
        state.pending[folder] = None
        if state.settle is None:
            state.settle = self.clock.callLater(IDLE_SETTLE, self._settled_change, state)

    def _settled_change(self, state: _AccountState) -> None:
        state.settle = None
        if state.running is None and state.pending:
            self._start(state, self._pending(state))
        # else: the poll under way starts it when it ends (_finished)

    def _pending(self, state: _AccountState) -> tuple[str, ...]:
        return tuple(folder for folder in self._folders(state.account) if folder in state.pending)

    def _stop_watching(self, state: _AccountState) -> list[Deferred[None]]:
        """End every IDLE of the account (DONE, LOGOUT); what fires when each has ended."""
        ending = []
        for watcher in state.watchers.values():
            if watcher.retry is not None and watcher.retry.active():
                watcher.retry.cancel()
            watcher.retry = None
            session = watcher.session
            if session is not None:
                closing: Deferred[None] = session.close()
                closing.addErrback(lambda _failure: None)  # at stop, a session lost is no news
                ending.append(self._bounded(closing, session))
            if watcher.opening is not None:
                ending.append(_settled(watcher.opening))
        return ending

    def _bounded(self, closing: Deferred[None], session: Any) -> Deferred[None]:
        """`closing`, the session dropped if it takes over IDLE_STOP."""
        timer = self.clock.callLater(IDLE_STOP, session.abort)

        def over(result: None) -> None:
            if timer.active():
                timer.cancel()
            return result

        return closing.addBoth(over)

    def _to_delete(
        self, account: FetchAccount, listed: list[RemoteMessage], seen: Any
    ) -> Iterable[RemoteMessage]:
        """Listed messages that are durable in our queue and may go: all of them, unless kept."""
        now = self.clock.seconds()
        for message in listed:
            first = seen.first_seen(message.uid)
            if first is None:
                continue
            if not account.keep or (account.delete_after and now - first >= account.delete_after):
                yield message

    def _report_oversized(self, state: _AccountState, folder: str, oversized: list[RemoteMessage]) -> None:
        for message in oversized:
            key = (folder, message.uid)
            if key in state.reported:
                continue
            state.reported.add(key)
            log.warn(
                "fetch: {account}: message {uid} in {folder} is {size} octets, over max_size"
                " {limit}: left on the server",
                account=state.account.name,
                uid=message.uid,
                folder=folder,
                size=message.size,
                limit=state.account.max_size,
            )


def domain_of_account(account: FetchAccount, domain: str) -> bool:
    """Whether an account delivers into `domain` (for ETRN)."""
    domain = domain.lower().rstrip(".").lstrip("@#")
    targets = list(account.deliver_to)
    if account.multidrop is not None:
        targets.extend(address for _local, address in account.multidrop.local_parts)
        targets.extend(f"x@{internal}" for _external, internal in account.multidrop.domain_map)
        if account.multidrop.unknown:
            targets.append(account.multidrop.unknown)
    return any(target.rpartition("@")[2].lower() == domain for target in targets)


def _settled(deferred: Deferred[Any]) -> Deferred[None]:
    """A Deferred that fires when `deferred` does, whatever the outcome, leaving it untouched."""
    settled: Deferred[None] = Deferred()

    def tell(result: Any) -> Any:
        settled.callback(None)
        return result

    deferred.addBoth(tell)
    return settled
