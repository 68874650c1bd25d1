"""The SMTP server's AUTH command: the SASL exchange and the credentials check (RFC 4954).

A mixin of `gateway.smtp.server.SmtpServerProtocol`. The mechanisms themselves
are `gateway.smtp._sasl`; the credentials are the factory's `ICredentials`, and
the session checks (`IAuthGuard` filters) may refuse an attempt or slow down the
answer to a failed one.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import TypeAlias

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import deferLater

from gateway.smtp import _sasl
from gateway.smtp._conversation import Conversation, Mode, log
from gateway.smtp.reply import Reply

Mechanism: TypeAlias = _sasl.Plain | _sasl.Login | _sasl.CramMd5


class AuthExchange(Conversation):
    """AUTH: which mechanisms are offered, the challenge/response lines, the verdict."""

    _mechanism: Mechanism | None  # the exchange under way
    _auth_failures: int

    def _init_auth(self) -> None:
        self._mechanism = None
        self._auth_failures = 0

    def _mechanisms(self) -> dict[str, Callable[[], Mechanism]]:
        credentials = self.server.credentials
        if credentials is None:
            return {}
        mechanisms: dict[str, Callable[[], Mechanism]] = {
            "PLAIN": _sasl.Plain,
            "LOGIN": _sasl.Login,
        }
        if credentials.supports_cram_md5:
            clock = self.server.clock
            mechanisms["CRAM-MD5"] = lambda: _sasl.CramMd5(self.settings.hostname, clock.seconds())
        return mechanisms

    def _auth(self, argument: str) -> Reply | None:
        mechanisms = self._mechanisms()
        if not mechanisms:
            return Reply(502, "5.5.1", "Error: authentication not enabled")
        if not self.session.esmtp:
            return Reply(503, "5.5.1", "Error: send EHLO first")
        if self.settings.auth_requires_tls and not self.session.tls:
            return Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
        if self.session.authenticated_user is not None:
            return Reply(503, "5.5.1", "Error: already authenticated")
        if self._envelope is not None:
            return Reply(503, "5.5.1", "Error: AUTH not allowed in a mail transaction")
        name, _, initial = argument.strip(" ").partition(" ")
        factory = mechanisms.get(name.upper())
        if factory is None:
            return Reply(504, "5.5.4", "Error: unsupported authentication mechanism")
        response: bytes | None = None
        if initial:
            response = _decode_base64(initial)
            if response is None:
                return Reply(501, "5.5.2", "Error: invalid base64 in initial response")

        def allowed(refusal: Reply | None) -> Reply | None:
            if refusal is not None:
                return refusal
            self._mechanism = factory()
            step = self._sasl_step(response)
            if step is not None:
                return step
            return None  # a 334 challenge went out, or the credentials check is waiting

        self._wait(maybeDeferred(self.checks.auth_allowed, self.session), allowed, "AUTH")
        return None

    def _auth_response(self, line: bytes) -> None:
        self._mode = Mode.COMMAND
        if line == b"*":
            self._mechanism = None
            self._reply(Reply(501, "5.0.0", "Authentication cancelled"), "AUTH")
            return
        response = _decode_base64(line.decode("ascii", "replace"))
        if response is None:
            self._mechanism = None
            self._reply(Reply(501, "5.5.2", "Error: invalid base64 in response"), "AUTH")
            return
        reply = self._sasl_step(response)
        if reply is not None:
            self._reply(reply, "AUTH")

    def _sasl_step(self, response: bytes | None) -> Reply | None:
        mechanism = self._mechanism
        credentials = self.server.credentials
        assert mechanism is not None and credentials is not None
        try:
            step = mechanism.step(response)
        except _sasl.SaslError as error:
            self._mechanism = None
            return Reply(501, "5.5.2", f"Error: {error}")
        if isinstance(step, _sasl.Challenge):
            self._mode = Mode.AUTH
            # a 334 challenge is base64 after one space, even when empty (RFC 4954 4)
            self._send(b"334 " + base64.b64encode(step.data) + b"\r\n")
            return None
        self._mechanism = None
        if isinstance(step, _sasl.PlainAttempt):
            if step.authzid:
                check: Deferred[bool] = Deferred()
                check.callback(False)
            else:
                check = maybeDeferred(credentials.check_plain, step.user, step.password)
        else:
            check = maybeDeferred(credentials.check_cram_md5, step.user, step.challenge, step.digest)
        self._wait(
            check,
            lambda valid: self._auth_result(valid, step.user, mechanism.name),
            f"AUTH {mechanism.name}",
            on_error=Reply(454, "4.7.0", "Temporary authentication failure"),
        )
        return None

    def _auth_result(self, valid: bool, user: str, mechanism: str) -> Reply | Deferred[Reply]:
        if valid:
            self.checks.auth_result(self.session, user, True)
            self.session = attrs.evolve(self.session, authenticated_user=user, may_relay=True)
            log.info(
                "smtpd: [{peer}]:{port}: authenticated user={user} mechanism={mechanism}",
                peer=self.session.peer_host,
                port=self.session.peer_port,
                user=user,
                mechanism=mechanism,
            )
            return Reply(235, "2.7.0", "Authentication successful")
        self._auth_failures += 1
        log.info(
            "smtpd: [{peer}]:{port}: AUTH failed user={user!r} mechanism={mechanism}",
            peer=self.session.peer_host,
            port=self.session.peer_port,
            user=user[:64],
            mechanism=mechanism,
        )
        failed = Reply(535, "5.7.8", "Authentication credentials invalid")
        if self._auth_failures >= self.settings.max_auth_failures:
            failed = Reply(421, "4.7.0", f"{self.settings.hostname} Error: too many AUTH failures")
        delay = max(self.settings.auth_failure_delay, self.checks.auth_result(self.session, user, False))
        if delay <= 0:
            return failed
        return deferLater(self.server.clock, delay, lambda: failed)


def _decode_base64(text: str) -> bytes | None:
    """Strict base64 (``=`` alone is the empty response); None if malformed."""
    text = text.strip()
    if text == "=":
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
