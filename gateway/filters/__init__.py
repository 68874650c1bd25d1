"""The filter chain: small filters, each with a name and the stages it acts on.

`Request` is what a filter sees; `FilterServices` is what it may use (the clock,
DNS, the state store, the connection counter). Built-in filters are listed in
`gateway.filters.registry`; third-party ones come from the ``mailgate.filters``
entry-point group. `gateway.filters.chain` runs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from gateway.model import Direction, Envelope, Recipient, Session, Stage

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.content import MessageContent

__all__ = ["FilterServices", "Request"]


@attrs.frozen
class Request:
    """What a filter is asked about: a session, and as far as it has got, a transaction.

    `envelope` is set from MAIL on (at RCPT it holds the recipients accepted so
    far); `recipient` is the one being checked at RCPT; `counts` carries the
    session's numbers so far ("recipients", "unknown_recipients", "rset",
    "errors", "commands", "messages") for the limit filters. `message` is set at
    the DATA stage only: the message's raw bytes and its shared parse.
    """

    stage: Stage
    direction: Direction
    session: Session
    envelope: Envelope | None = None
    recipient: Recipient | None = None
    counts: dict[str, int] = attrs.field(factory=dict, eq=False)
    message: MessageContent | None = attrs.field(default=None, eq=False)


class FilterServices:
    """What filters share in one process; each part is built on first use.

    A worker process builds its own; the parts that must be shared between
    processes (connection counts, the state store) reach across by themselves.
    """

    def __init__(
        self,
        config: Config,
        reactor: Any,
        *,
        anvil: Any = None,
        store: Any = None,
        dns: Any = None,
        outbox: Any = None,
    ):
        self.config = config
        self.reactor = reactor
        self._anvil = anvil
        self._store = store
        self._dns = dns
        self._outbox = outbox

    @property
    def outbox(self) -> Any:
        """How filters send mail of their own: notices, auto-replies (`gateway.interfaces.IOutbox`)."""
        if self._outbox is None:
            raise RuntimeError("this process has no outbox (the gateway wires one at start)")
        return self._outbox

    @property
    def hostname(self) -> str:
        return self.config.gateway.hostname

    @property
    def dns(self) -> Any:
        """Asynchronous DNS for filters (`gateway.filters.dns.DnsLookups`)."""
        if self._dns is None:
            from gateway.filters.dns import DnsLookups

            self._dns = DnsLookups.from_config(self.config.dns, self.reactor)
        return self._dns

    def dns_stats(self) -> dict[str, int] | None:
        """This process's DNS numbers (the SMTP workers' included: it asks for them); None
        before the filters' first lookup, or when the DNS is not this process's own."""
        stats = getattr(self._dns, "stats", None)
        return stats() if stats is not None else None

    @property
    def store(self) -> Any:
        """The state store (`gateway.state.IStateStore`; SQLite under the state directory)."""
        if self._store is None:
            from gateway.state import open_store

            self._store = open_store(self.config, self.reactor)
        return self._store

    @property
    def anvil(self) -> Any:
        """Connection and event counts per client, shared by all SMTP processes."""
        if self._anvil is None:
            from gateway.filters.anvil import connect_anvil

            self._anvil = connect_anvil(self.config, self.reactor)
        return self._anvil
