"""SMTP AUTH: the credentials file, password hashes, CRAM-MD5 contexts, SASL, the dialogue."""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.logger import capturedLogs
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from gateway.smtp import _sasl
from gateway.smtp.auth import (
    CredentialsError,
    FileCredentials,
    check_stored,
    cram_md5_context,
    cram_md5_digest,
    hash_password,
    verify_password,
)
from tests.unit.test_smtp_server import SETTINGS, Dialogue

ALICE = hash_password("alice-secret", "SCRYPT", cost=4)
BOB = hash_password("bob-secret", "CRAM-MD5")
CAROL = hash_password("carol-secret", "PBKDF2-SHA256", cost=1000)


def credentials(**kwargs: Any) -> FileCredentials:
    lines = ["# users", "", f"alice:{ALICE}", f"bob:{BOB}", f"carol:{CAROL}"]
    return FileCredentials.parse(lines, **kwargs)


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


# --- hashes and the file ----------------------------------------------------------------


@pytest.mark.parametrize("stored", [ALICE, BOB, CAROL])
def test_hash_and_verify(stored: str) -> None:
    password = {ALICE: "alice-secret", BOB: "bob-secret", CAROL: "carol-secret"}[stored]
    assert verify_password(password, stored)
    assert not verify_password(password + "x", stored)
    check_stored(stored)


def test_default_hash_is_scrypt_with_fresh_salt() -> None:
    first, second = hash_password("pw"), hash_password("pw")
    assert first.startswith("{SCRYPT}$scrypt$ln=14,r=8,p=1$") and first != second


def test_cram_md5_context_is_dovecots() -> None:
    # `doveadm pw -s CRAM-MD5 -p test` (the opad state, then the ipad state)
    assert hash_password("test", "CRAM-MD5") == ("{CRAM-MD5}" + cram_md5_context(b"test").hex())
    # RFC 2195's example exchange
    context = cram_md5_context(b"tanstaaftanstaaf")
    challenge = b"<1896.697170952@postoffice.reston.mci.net>"
    assert cram_md5_digest(context, challenge) == "b913a602c7eda7a495b4e6e7334d3890"


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=100), st.binary(max_size=200))
def test_cram_md5_digest_equals_hmac_md5(password: bytes, challenge: bytes) -> None:
    expected = hmac.new(password, challenge, hashlib.md5).hexdigest()
    assert cram_md5_digest(cram_md5_context(password), challenge) == expected


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("alice", "line 1: expected user:{SCHEME}hash"),
        ("alice:{MD5}abc", "line 1: unknown scheme {MD5}"),
        ("alice:{CRAM-MD5}abc", "line 1: a {CRAM-MD5} entry is 64 hex digits"),
        ("alice:{SCRYPT}$scrypt$ln=99,r=8,p=1$AAAAAAAAAAA$" + "A" * 43, "scrypt parameters out of range"),
        ("alice:{PBKDF2-SHA256}$pbkdf2-sha256$i=x$AAAA$AAAA", "bad parameters"),
    ],
)
def test_bad_credentials_lines_are_named(line: str, message: str) -> None:
    with pytest.raises(CredentialsError) as caught:
        FileCredentials.parse([line], source="/etc/mailgate/users")
    assert str(caught.value).startswith("/etc/mailgate/users, line 1: ")
    assert message in str(caught.value)


def test_duplicate_user_is_an_error(tmp_path: Any) -> None:
    path = tmp_path / "users"
    path.write_text(f"alice:{ALICE}\nalice:{BOB}\n")
    with pytest.raises(CredentialsError, match="line 2: user 'alice' is listed twice"):
        FileCredentials.from_file(str(path))


def test_checks_inline() -> None:
    users = credentials()
    assert users.supports_cram_md5
    assert _result(users.check_plain("alice", "alice-secret")) is True
    assert _result(users.check_plain("alice", "wrong")) is False
    assert _result(users.check_plain("nobody", "alice-secret")) is False
    assert _result(users.check_plain("bob", "bob-secret")) is True  # CRAM entries do PLAIN too
    digest = hmac.new(b"bob-secret", b"<x@y>", hashlib.md5).hexdigest()
    assert _result(users.check_cram_md5("bob", b"<x@y>", digest)) is True
    assert _result(users.check_cram_md5("bob", b"<x@z>", digest)) is False
    assert _result(users.check_cram_md5("alice", b"<x@y>", digest)) is False  # no CRAM entry
    assert not FileCredentials.parse([f"alice:{ALICE}"]).supports_cram_md5


def _result(deferred: Deferred[Any]) -> Any:
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results, "expected a fired Deferred"
    return results[0]


class ThreadPoolTests(TestCase):
    def test_slow_hashes_run_in_the_given_pool(self) -> Deferred[None]:
        pool = ThreadPool(minthreads=1, maxthreads=1, name="auth-test")
        pool.start()
        self.addCleanup(pool.stop)
        users = credentials(reactor=reactor, threadpool=pool)
        checked = users.check_plain("alice", "alice-secret")
        self.assertNoResult(checked)  # type: ignore[no-untyped-call]  # not on the reactor thread

        def check(valid: bool) -> None:
            assert valid

        return checked.addCallback(check)


# --- SASL mechanisms ----------------------------------------------------------------------


def test_sasl_plain() -> None:
    assert _sasl.Plain().step(None) == _sasl.Challenge(b"")
    assert _sasl.Plain().step(b"\x00u\x00p") == _sasl.PlainAttempt("u", "p")
    assert _sasl.Plain().step(b"u\x00u\x00p") == _sasl.PlainAttempt("u", "p")
    assert _sasl.Plain().step(b"admin\x00u\x00p") == _sasl.PlainAttempt("u", "p", "admin")
    for bad in (b"u\x00p", b"\x00\x00p", b"a\x00b\x00c\x00d", b"\x00\xff\x00p"):
        with pytest.raises(_sasl.SaslError):
            _sasl.Plain().step(bad)


def test_sasl_cram_md5_refuses_an_initial_response() -> None:
    with pytest.raises(_sasl.SaslError):
        _sasl.CramMd5("mx.test", 0).step(b"x")
    mechanism = _sasl.CramMd5("mx.test", 1234)
    challenge = mechanism.step(None)
    assert isinstance(challenge, _sasl.Challenge) and challenge.data.endswith(b".1234@mx.test>")
    with pytest.raises(_sasl.SaslError):
        mechanism.step(b"user not-hex")


# --- the dialogue -------------------------------------------------------------------------


def tls_dialogue(**settings_changes: Any) -> Dialogue:
    dialogue = Dialogue(
        attrs.evolve(SETTINGS, **settings_changes), tls_context=object(), credentials=credentials()
    )
    dialogue.ehlo()
    dialogue.ask("STARTTLS")
    dialogue.ehlo()
    return dialogue


def test_auth_is_offered_only_after_tls() -> None:
    dialogue = Dialogue(tls_context=object(), credentials=credentials())
    lines = dialogue.ehlo()
    assert not any("AUTH" in line for line in lines)
    assert dialogue.ask("AUTH PLAIN " + b64("\0alice\0alice-secret")) == [
        "538 5.7.11 Encryption required for requested authentication mechanism"
    ]
    dialogue.ask("STARTTLS")
    assert "250 AUTH PLAIN LOGIN CRAM-MD5" in dialogue.ehlo()


def test_auth_plain_with_initial_response_lets_the_client_relay() -> None:
    dialogue = tls_dialogue()
    assert dialogue.ask("AUTH PLAIN " + b64("\0alice\0alice-secret")) == [
        "235 2.7.0 Authentication successful"
    ]
    assert not any("AUTH" in line for line in dialogue.ehlo())
    dialogue.ask("MAIL FROM:<alice@example.com>")
    dialogue.ask("RCPT TO:<someone@example.net>")
    dialogue.send_message()
    session = dialogue.reception.sessions[-1]
    assert session.authenticated_user == "alice" and session.may_relay
    assert b" with ESMTPSA id " in dialogue.reception.messages[0].data


def test_auth_plain_without_initial_response() -> None:
    dialogue = tls_dialogue()
    dialogue.send(b"AUTH PLAIN\r\n")
    assert dialogue.transport.value() == b"334 \r\n"  # type: ignore[no-untyped-call]
    dialogue.take()
    assert dialogue.ask(b64("\0carol\0carol-secret")) == ["235 2.7.0 Authentication successful"]


def test_auth_login() -> None:
    dialogue = tls_dialogue()
    assert dialogue.ask("AUTH LOGIN") == ["334 " + b64("Username:")]
    assert dialogue.ask(b64("alice")) == ["334 " + b64("Password:")]
    assert dialogue.ask(b64("alice-secret")) == ["235 2.7.0 Authentication successful"]


def test_auth_login_with_initial_user() -> None:
    dialogue = tls_dialogue()
    assert dialogue.ask("AUTH LOGIN " + b64("alice")) == ["334 " + b64("Password:")]
    assert dialogue.ask(b64("alice-secret")) == ["235 2.7.0 Authentication successful"]


def test_auth_cram_md5() -> None:
    dialogue = tls_dialogue()
    (line,) = dialogue.ask("AUTH CRAM-MD5")
    challenge = base64.b64decode(line[4:])
    assert challenge.startswith(b"<") and challenge.endswith(b"@mx.test>")
    digest = hmac.new(b"bob-secret", challenge, hashlib.md5).hexdigest()
    assert dialogue.ask(b64(f"bob {digest}")) == ["235 2.7.0 Authentication successful"]


def test_auth_cancel_and_malformed_input_are_501_not_tracebacks() -> None:
    dialogue = tls_dialogue()
    dialogue.ask("AUTH LOGIN")
    assert dialogue.ask("*") == ["501 5.0.0 Authentication cancelled"]
    assert dialogue.ask("AUTH PLAIN !!!notbase64") == ["501 5.5.2 Error: invalid base64 in initial response"]
    dialogue.ask("AUTH LOGIN")
    assert dialogue.ask("@@@") == ["501 5.5.2 Error: invalid base64 in response"]
    assert dialogue.ask("AUTH PLAIN " + b64("alice-only")) == [
        "501 5.5.2 Error: PLAIN response must be authzid NUL user NUL password"
    ]
    assert dialogue.ask("AUTH CRAM-MD5 " + b64("x")) == [
        "501 5.5.2 Error: CRAM-MD5 takes no initial response"
    ]
    assert dialogue.ask("AUTH") == ["504 5.5.4 Error: unsupported authentication mechanism"]
    assert dialogue.ask("AUTH GSSAPI") == ["504 5.5.4 Error: unsupported authentication mechanism"]
    assert dialogue.ask("NOOP") == ["250 2.0.0 Ok"]


def test_auth_failure_is_delayed_and_limited() -> None:
    dialogue = tls_dialogue(auth_failure_delay=2.0, max_auth_failures=3, max_errors=100)
    for attempt in range(3):
        dialogue.send(("AUTH PLAIN " + b64("\0alice\0wrong") + "\r\nNOOP\r\n").encode())
        assert dialogue.take() == []
        dialogue.clock.advance(2)
        if attempt < 2:
            assert dialogue.codes() == ["535 5.7.8 Authentication credentials invalid", "250 2.0.0 Ok"]
    assert dialogue.codes() == ["421 4.7.0 mx.test Error: too many AUTH failures"]
    assert dialogue.closed


def test_auth_state_errors() -> None:
    dialogue = Dialogue(
        attrs.evolve(SETTINGS, auth_requires_tls=False), credentials=credentials(), tls_context=None
    )
    assert dialogue.ask("AUTH PLAIN") == ["503 5.5.1 Error: send EHLO first"]
    assert "250 AUTH PLAIN LOGIN CRAM-MD5" in dialogue.ehlo()
    dialogue.ask("MAIL FROM:<a@example.org>")
    assert dialogue.ask("AUTH PLAIN") == ["503 5.5.1 Error: AUTH not allowed in a mail transaction"]
    dialogue.ask("RSET")
    assert dialogue.ask("AUTH PLAIN " + b64("alice\0alice\0alice-secret"))[0].startswith("235")
    assert dialogue.ask("AUTH PLAIN " + b64("\0alice\0alice-secret")) == [
        "503 5.5.1 Error: already authenticated"
    ]


def test_auth_for_someone_else_is_refused() -> None:
    dialogue = tls_dialogue()
    assert dialogue.ask("AUTH PLAIN " + b64("bob\0alice\0alice-secret")) == [
        "535 5.7.8 Authentication credentials invalid"
    ]


def test_auth_backend_failure_is_454() -> None:
    class Broken:
        supports_cram_md5 = False

        def check_plain(self, user: str, password: str) -> Deferred[bool]:
            return fail(OSError("credentials file unreadable"))

    dialogue = Dialogue(attrs.evolve(SETTINGS, auth_requires_tls=False), credentials=Broken())
    dialogue.ehlo()
    with capturedLogs():
        assert dialogue.ask("AUTH PLAIN " + b64("\0alice\0pw")) == [
            "454 4.7.0 Temporary authentication failure"
        ]


def test_starttls_forgets_authentication() -> None:
    dialogue = Dialogue(
        attrs.evolve(SETTINGS, auth_requires_tls=False), credentials=credentials(), tls_context=object()
    )
    dialogue.ehlo()
    dialogue.ask("AUTH PLAIN " + b64("\0alice\0alice-secret"))
    dialogue.ask("STARTTLS")
    dialogue.ehlo()
    dialogue.ask("MAIL FROM:<a@example.org>")
    session = dialogue.reception.sessions[-1]
    assert session.authenticated_user is None and not session.may_relay
