"""Fixtures for real peers (see peers.py): each started fresh per test and stopped at teardown.

Simple fixtures start a peer with its defaults; the `make_*` factories take the constructor's
keyword arguments and stop everything they started when the test ends, pass or fail.

- `postfix_sink` / `make_postfix_sink(**kw)` -> PostfixSink (domain internal.test by default)
- `postfix_relay` / `make_postfix_relay(next_hop, **kw)` -> PostfixRelayWithAuth
  (`postfix_relay` forwards to `postfix_sink`)
- `smtp_sink` / `make_smtp_sink(**kw)` -> SmtpSink
- `nsd_server` / `make_nsd(zones)` -> NsdServer (DEFAULT_ZONES by default)
- `test_ca` -> CertificateAuthority (one per session)
- `swaks` -> peers.swaks, once swaks is known to be installed

A missing program fails the test when CI is set and skips it otherwise (peers.require_program).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from .peers import (
    CertificateAuthority,
    NsdServer,
    Peer,
    PostfixRelayWithAuth,
    PostfixSink,
    SmtpSink,
    require_program,
    require_root,
    stop_all_peers,
)
from .peers import swaks as run_swaks

POSTFIX_PROGRAMS = ("postfix", "postconf", "openssl")
DOVECOT_PROGRAMS = ("dovecot", "doveconf")
NSD_PROGRAMS = ("nsd", "nsd-checkconf", "nsd-checkzone")


def _require(*programs: str) -> None:
    for program in programs:
        require_program(program)
    require_root()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration is an integration test."""
    for item in items:
        if "tests/integration/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.integration)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    stop_all_peers()


class _Started:
    """Starts peers for one test and stops them all, last first, at teardown."""

    def __init__(self) -> None:
        self.peers: list[Peer] = []

    def start(self, peer: Peer) -> Any:
        self.peers.append(peer)
        peer.start()
        return peer

    def stop_all(self) -> None:
        errors = []
        for peer in reversed(self.peers):
            try:
                peer.stop()
            except Exception as error:  # keep stopping the others
                errors.append(f"{peer.kind}: {error!r}")
        if errors:
            raise RuntimeError("stopping peers failed: " + "; ".join(errors))


@pytest.fixture
def _peers() -> Iterator[_Started]:
    started = _Started()
    try:
        yield started
    finally:
        started.stop_all()


@pytest.fixture(scope="session")
def test_ca() -> Iterator[CertificateAuthority]:
    require_program("openssl")
    ca = CertificateAuthority()
    yield ca
    ca.cleanup()


@pytest.fixture
def make_postfix_sink(_peers: _Started, test_ca: CertificateAuthority) -> Callable[..., PostfixSink]:
    _require(*POSTFIX_PROGRAMS)

    def make(**kwargs: Any) -> PostfixSink:
        kwargs.setdefault("ca", test_ca)
        result: PostfixSink = _peers.start(PostfixSink(**kwargs))
        return result

    return make


@pytest.fixture
def postfix_sink(make_postfix_sink: Callable[..., PostfixSink]) -> PostfixSink:
    return make_postfix_sink()


@pytest.fixture
def make_postfix_relay(
    _peers: _Started, test_ca: CertificateAuthority
) -> Callable[..., PostfixRelayWithAuth]:
    _require(*POSTFIX_PROGRAMS, *DOVECOT_PROGRAMS)

    def make(next_hop: tuple[str, int], **kwargs: Any) -> PostfixRelayWithAuth:
        kwargs.setdefault("ca", test_ca)
        result: PostfixRelayWithAuth = _peers.start(PostfixRelayWithAuth(next_hop, **kwargs))
        return result

    return make


@pytest.fixture
def postfix_relay(
    make_postfix_relay: Callable[..., PostfixRelayWithAuth], postfix_sink: PostfixSink
) -> PostfixRelayWithAuth:
    """A smart host requiring STARTTLS + AUTH, relaying to `postfix_sink`."""
    return make_postfix_relay(postfix_sink.address)


@pytest.fixture
def make_smtp_sink(_peers: _Started) -> Callable[..., SmtpSink]:
    _require("smtp-sink")

    def make(**kwargs: Any) -> SmtpSink:
        result: SmtpSink = _peers.start(SmtpSink(**kwargs))
        return result

    return make


@pytest.fixture
def smtp_sink(make_smtp_sink: Callable[..., SmtpSink]) -> SmtpSink:
    return make_smtp_sink()


@pytest.fixture
def make_nsd(_peers: _Started) -> Callable[..., NsdServer]:
    _require(*NSD_PROGRAMS)

    def make(zones: Mapping[str, str] | None = None) -> NsdServer:
        result: NsdServer = _peers.start(NsdServer(zones))
        return result

    return make


@pytest.fixture
def nsd_server(make_nsd: Callable[..., NsdServer]) -> NsdServer:
    return make_nsd()


@pytest.fixture
def swaks() -> Callable[..., Any]:
    require_program("swaks")
    return run_swaks
