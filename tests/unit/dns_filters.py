"""Helpers for the tests of the DNS filters: build one from config text, ask it, read its verdict."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from gateway import config as configuration
from gateway.filters import FilterServices, Request, registry
from gateway.model import Direction, Envelope, Recipient, Session, Stage, Verdict

# host and domain names, good and bad: odd characters, empty and long labels, final dots
host_like_names = st.text(alphabet="aZ09_-.\u00fc\n", max_size=300) | st.from_regex(
    r"([a-z0-9-]{1,70}\.){1,5}[a-z0-9-]{1,70}\.?"
)


def build(name: str, options: str, dns: Any, *, extra: str = "") -> Any:
    """The filter instance `name`, built by the registry from ``[filters.<name>]`` `options`."""
    text = f'{extra}\n[filters]\ninbound = ["{name}"]\n[filters.{name}]\n{options}\n'
    cfg = configuration.parse(text, "mailgate.toml", base_dir="/")
    runner = registry.build_runner(cfg, FilterServices(cfg, Clock(), dns=dns, anvil=object(), store=object()))
    return runner.chains[Direction.INBOUND][0].filter


def config_error(name: str, options: str, dns: Any = None) -> str:
    with pytest.raises(configuration.ConfigError) as raised:
        build(name, options, dns)
    return str(raised.value)


def request(
    stage: Stage,
    client: str = "192.0.2.7",
    *,
    helo: str | None = "mail.client.test",
    sender: str = "someone@sender.test",
    recipient: str = "bob@example.com",
) -> Request:
    session = Session(client, 40000, "tcp:25:interface=192.0.2.25", helo=helo)
    envelope = Envelope(sender, ()) if stage in (Stage.MAIL, Stage.RCPT, Stage.DATA) else None
    rcpt = Recipient(recipient) if stage is Stage.RCPT else None
    return Request(stage, Direction.INBOUND, session, envelope, rcpt)


def verdict_of(answer: Verdict | Deferred[Verdict]) -> Verdict:
    """The verdict, from a filter that answered at once or whose DNS answers are in."""
    if isinstance(answer, Verdict):
        return answer
    found: list[Any] = []
    answer.addBoth(found.append)
    assert found, "the filter is still waiting"
    if isinstance(found[0], Failure):
        found[0].raiseException()
    assert isinstance(found[0], Verdict), found[0]
    return found[0]


def messages(events: list[dict[str, Any]]) -> list[str]:
    """Logged events as text (twisted.logger's format)."""
    from twisted.logger import formatEvent

    return [formatEvent(event) for event in events]
