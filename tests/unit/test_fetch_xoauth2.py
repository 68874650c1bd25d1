"""XOAUTH2 (Exchange Online, Gmail): the SASL exchange in POP3 and IMAP, the token command, the config."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from gateway.fetch import AuthenticationFailed
from gateway.fetch import poller as poller_module
from gateway.fetch._token import TokenCommandFailed, fetch_token, xoauth2_response
from gateway.fetch.accounts import read_passwords
from gateway.fetch.pop3 import Pop3Session
from tests.unit import test_fetch_imap as imap
from tests.unit import test_fetch_pop3 as pop3
from tests.unit.test_fetch_accounts import error, parse
from tests.unit.test_fetch_accounts import secret as secret_file
from tests.unit.test_fetch_poller import Gateway, MemoryMailServer, account, events, message

__all__ = ["events"]  # the fixture, used by name

TOKEN = "ya29.a0AfB_byC-token-0123456789"
SASL = base64.b64encode(b"user=alice\x01auth=Bearer " + TOKEN.encode() + b"\x01\x01")
ERROR = base64.b64encode(json.dumps({"status": "401", "schemes": "bearer", "scope": "https://mail"}).encode())


def test_the_sasl_response_is_user_bearer_token_and_two_ctrl_a() -> None:
    assert base64.b64decode(xoauth2_response("alice", TOKEN)) == (
        b"user=alice\x01auth=Bearer " + TOKEN.encode() + b"\x01\x01"
    )


# -- POP3 ---------------------------------------------------------------------------------------------


def pop3_dialogue(**changes: Any) -> pop3.Dialogue:
    dialogue = pop3.Dialogue(**{"auth": "xoauth2", "password": TOKEN, **changes})
    dialogue.server(pop3.GREETING)
    assert dialogue.sent() == b"CAPA\r\n"
    dialogue.server(b"+OK\r\nUIDL\r\nSASL XOAUTH2\r\n.\r\n")
    return dialogue


def test_pop3_auth_xoauth2_with_the_initial_response() -> None:
    dialogue = pop3_dialogue()
    assert dialogue.sent() == b"AUTH XOAUTH2 " + SASL + b"\r\n"
    dialogue.server(b"+OK Logged in.\r\n")
    assert isinstance(pop3.result_of(dialogue.login), Pop3Session)


def test_pop3_a_long_token_goes_after_the_empty_challenge() -> None:
    long_token = "x" * 400
    dialogue = pop3_dialogue(password=long_token)
    assert dialogue.sent() == b"AUTH XOAUTH2\r\n"  # RFC 5034: no AUTH line over 255 octets
    dialogue.server(b"+ \r\n")
    assert dialogue.sent() == xoauth2_response("alice", long_token) + b"\r\n"
    dialogue.server(b"+OK\r\n")
    pop3.result_of(dialogue.login)


def test_pop3_the_error_continuation_is_answered_empty_and_the_login_fails() -> None:
    dialogue = pop3_dialogue()
    dialogue.sent()
    dialogue.server(b"+ " + ERROR + b"\r\n")
    assert dialogue.sent() == b"\r\n"
    dialogue.server(b"-ERR Authentication failed.\r\n")
    failure = pop3.failure_of(dialogue.login)
    assert isinstance(failure, AuthenticationFailed)
    assert "status 401" in str(failure) and TOKEN not in str(failure)


def test_pop3_a_plain_err_is_authentication_failed() -> None:
    dialogue = pop3_dialogue()
    dialogue.sent()
    dialogue.server(b"-ERR [AUTH] token expired\r\n")
    assert isinstance(pop3.failure_of(dialogue.login), AuthenticationFailed)


# -- IMAP ---------------------------------------------------------------------------------------------


def test_imap_authenticate_xoauth2_with_sasl_ir() -> None:
    dialogue = imap.Dialogue(auth="xoauth2", password=TOKEN)
    dialogue.expect(
        b"M1 AUTHENTICATE XOAUTH2 " + SASL + b"\r\n", b"M1 OK [CAPABILITY IMAP4rev1 UIDPLUS] ok\r\n"
    )
    dialogue.expect(b'M2 SELECT "INBOX"\r\n', imap.SELECTED.replace(b"%s", b"M2"))
    imap.result_of(dialogue.opening)


def test_imap_authenticate_xoauth2_without_sasl_ir_waits_for_the_continuation() -> None:
    dialogue = imap.Dialogue(
        b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] ready.\r\n", auth="xoauth2", password=TOKEN
    )
    dialogue.expect(b"M1 AUTHENTICATE XOAUTH2\r\n", b"+ \r\n")
    dialogue.expect(SASL + b"\r\n", b"M1 OK [CAPABILITY IMAP4rev1] ok\r\n")
    dialogue.expect(b'M2 SELECT "INBOX"\r\n', imap.SELECTED.replace(b"%s", b"M2"))
    imap.result_of(dialogue.opening)


def test_imap_the_error_continuation_is_answered_empty_and_the_login_fails() -> None:
    dialogue = imap.Dialogue(auth="xoauth2", password=TOKEN)
    dialogue.expect(b"M1 AUTHENTICATE XOAUTH2 " + SASL + b"\r\n", b"+ " + ERROR + b"\r\n")
    dialogue.expect(b"\r\n", b"M1 NO [AUTHENTICATIONFAILED] Invalid credentials\r\n")
    failure = imap.failure_of(dialogue.opening)
    assert isinstance(failure, AuthenticationFailed)
    assert "status 401" in str(failure) and TOKEN not in str(failure)


# -- the token command --------------------------------------------------------------------------------


class FakeProcessTransport:
    def __init__(self) -> None:
        self.signals: list[str] = []
        self.stdin_closed = False

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, signal: str) -> None:
        self.signals.append(signal)


class ProcessReactor(Clock):
    """A Clock that records spawnProcess and lets the test play the process."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, str, list[str]]] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: Any = None) -> None:
        self.spawned.append((protocol, executable, args))
        protocol.makeConnection(FakeProcessTransport())


def run(output: bytes, reason: BaseException, **options: Any) -> tuple[Deferred[str], ProcessReactor]:
    reactor = ProcessReactor()
    token = fetch_token("oauth2-helper --refresh 'secret arg'", reactor, **options)
    protocol, executable, args = reactor.spawned[0]
    assert (executable, args) == ("/bin/sh", ["/bin/sh", "-c", "oauth2-helper --refresh 'secret arg'"])
    protocol.outReceived(output)
    protocol.errReceived(b"stderr noise with a refresh token\n")
    protocol.processEnded(Failure(reason))  # type: ignore[no-untyped-call]
    return token, reactor


def test_the_first_line_of_the_output_is_the_token() -> None:
    token, _reactor = run(TOKEN.encode() + b"\nrefresh-token-on-line-two\n", ProcessDone(0))  # type: ignore[no-untyped-call]
    assert pop3.result_of(token) == TOKEN


def test_a_failing_command_names_its_exit_status_not_its_output() -> None:
    token, _reactor = run(b"some output with a secret\n", ProcessTerminated(exitCode=3))  # type: ignore[no-untyped-call]
    failure = pop3.failure_of(token)
    assert isinstance(failure, TokenCommandFailed) and isinstance(failure, AuthenticationFailed)
    assert "exit status 3" in str(failure) and "oauth2-helper" in str(failure)
    assert "secret" not in str(failure)


def test_no_token_is_an_error() -> None:
    token, _reactor = run(b"\n", ProcessDone(0))  # type: ignore[no-untyped-call]
    assert "printed no token" in str(pop3.failure_of(token))


def test_a_command_that_hangs_is_killed() -> None:
    reactor = ProcessReactor()
    token = fetch_token("sleep 100", reactor, timeout=5)
    protocol = reactor.spawned[0][0]
    reactor.advance(5)
    assert protocol.transport.signals == ["KILL"]
    protocol.processEnded(Failure(ProcessTerminated(signal=9)))  # type: ignore[no-untyped-call]
    assert "took more than 5 s" in str(pop3.failure_of(token))


# -- the config and the poller ------------------------------------------------------------------------


def xoauth2_text(base: Path, extra: str = 'token_command = "oauth2ms --encode-xoauth2=no"') -> str:
    return f"""
[fetch]

[[fetch.accounts]]
name = "exo"
protocol = "imap"
server = "outlook.office365.com"
username = "sales@corp.example"
auth = "xoauth2"
deliver_to = ["sales@corp.example"]
{extra}
"""


def test_xoauth2_needs_a_token_command_and_no_password_file(tmp_path: Path) -> None:
    fetch = parse(xoauth2_text(tmp_path), tmp_path)
    [exo] = fetch.accounts
    assert (exo.auth, exo.token_command, exo.password_file) == ("xoauth2", "oauth2ms --encode-xoauth2=no", "")
    assert read_passwords(fetch, "mailgate.toml") == fetch  # nothing to read for it
    assert "token_command: is required" in error(xoauth2_text(tmp_path, ""), tmp_path)
    with_file = xoauth2_text(tmp_path) + f'password_file = "{secret_file(tmp_path)}"\n'
    assert "password_file: is not used" in error(with_file, tmp_path)
    plain = xoauth2_text(tmp_path).replace('auth = "xoauth2"', f'password_file = "{secret_file(tmp_path)}"')
    assert "token_command: is only used" in error(plain, tmp_path)


def test_the_poller_runs_the_token_command_at_each_login(monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = iter(["token-one", "token-two"])
    commands: list[str] = []

    def token_command(command: str, reactor: Any) -> Deferred[str]:
        commands.append(command)
        return succeed(next(tokens))

    monkeypatch.setattr(poller_module, "fetch_token", token_command)
    server = MemoryMailServer()
    server.passwords["sales"] = "token-one"
    gateway = Gateway(account(auth="xoauth2", token_command="get-token", password=""), server=server)
    gateway.server.deliver("sales", message(1))
    assert gateway.poll()[0]["messages"] == 1
    server.passwords["sales"] = "token-two"  # a fresh token for the next login
    gateway.server.deliver("sales", message(2))
    assert gateway.poll()[0]["messages"] == 1
    assert commands == ["get-token", "get-token"]
    assert [connect.password for connect in server.connects] == ["token-one", "token-two"]


def test_a_failing_token_command_is_a_refused_login_and_connects_nowhere(
    monkeypatch: pytest.MonkeyPatch, events: list[str]
) -> None:
    def token_command(command: str, reactor: Any) -> Deferred[str]:
        return fail(TokenCommandFailed("the token command (get-token) failed with exit status 2"))

    monkeypatch.setattr(poller_module, "fetch_token", token_command)
    server = MemoryMailServer()
    gateway = Gateway(account(auth="xoauth2", token_command="get-token", password=""), server=server)
    [result] = gateway.poll()
    assert "exit status 2" in result["error"]
    assert server.connects == []
