"""The OAuth 2 access token of an XOAUTH2 account, from its configured command.

`fetch_token(command, reactor)` runs the account's ``token_command`` with
``/bin/sh -c`` (so it may be a pipeline, like fetchmail's passwordeval) at
each login, without blocking the reactor (`spawnProcess`), and fires with the
first line of its standard output: the access token (refreshing it is the
command's business: oauth2ms, mutt_oauth2.py, a vault client...).

The token is a password: it appears in no error and no log line. The
command's output is not shown either (it may hold a refresh token); a
command that fails is a `TokenCommandFailed` (an `AuthenticationFailed`, so
repeated failures raise the account's alert) naming the program and its exit
status or signal. A command still running after `TOKEN_TIMEOUT` seconds is
killed and fails the same way.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import shlex
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from gateway.fetch import AuthenticationFailed

__all__ = ["TOKEN_TIMEOUT", "TokenCommandFailed", "fetch_token", "xoauth2_error", "xoauth2_response"]

TOKEN_TIMEOUT = 30.0  # seconds the command may take (it may have to refresh the token over the network)
MAX_OUTPUT = 64 * 1024  # a token is a few KB at most; more is not read
SHELL = "/bin/sh"


class TokenCommandFailed(AuthenticationFailed):
    """The token command failed (exit status, signal, timeout or no token): no login was tried."""


def program_of(command: str) -> str:
    """The command's program, which errors name (its arguments may hold secrets)."""
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    return os.path.basename(words[0]) if words else "(empty)"


class _TokenProtocol(ProcessProtocol):
    def __init__(self, command: str, clock: IReactorTime, timeout: float) -> None:
        self.program = program_of(command)
        self.clock = clock
        self.timeout = timeout
        self.output = b""
        self.timer: IDelayedCall | None = None
        self.timed_out = False
        self.done: Deferred[str] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.closeStdin()
        self.timer = self.clock.callLater(self.timeout, self._kill)

    def outReceived(self, data: bytes) -> None:
        if len(self.output) < MAX_OUTPUT:
            self.output += data[: MAX_OUTPUT - len(self.output)]

    def errReceived(self, data: bytes) -> None:
        pass  # not shown anywhere: it may quote the secrets the command works with

    def _kill(self) -> None:
        self.timer = None
        self.timed_out = True
        if self.transport is not None:
            with contextlib.suppress(ProcessExitedAlready):  # it ended meanwhile
                self.transport.signalProcess("KILL")

    def processEnded(self, reason: Failure) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        name = f"the token command ({self.program})"
        if self.timed_out:
            self.done.errback(TokenCommandFailed(f"{name} took more than {self.timeout:g} s: killed"))
            return
        if not isinstance(reason.value, ProcessDone):
            status = getattr(reason.value, "exitCode", None)
            signal = getattr(reason.value, "signal", None)
            how = f"exit status {status}" if status is not None else f"signal {signal}"
            self.done.errback(TokenCommandFailed(f"{name} failed with {how}"))
            return
        token = self.output.split(b"\n", 1)[0].strip()
        if not token:
            self.done.errback(TokenCommandFailed(f"{name} printed no token (its first line is empty)"))
        elif any(byte < 0x21 or byte > 0x7E for byte in token):
            self.done.errback(TokenCommandFailed(f"{name} printed something that is not a token"))
        else:
            self.done.callback(token.decode("ascii"))


def fetch_token(command: str, reactor: Any, timeout: float = TOKEN_TIMEOUT) -> Deferred[str]:
    """Run `command` with /bin/sh -c; fires with the first line of its output (see the module docstring).

    `reactor` provides IReactorProcess and IReactorTime (the real one, or a test's fake).
    """
    protocol = _TokenProtocol(command, reactor, timeout)
    spawner: IReactorProcess = reactor
    try:
        spawner.spawnProcess(protocol, SHELL, [SHELL, "-c", command], env=dict(os.environ))
    except OSError as error:
        protocol.done.errback(TokenCommandFailed(f"cannot run the token command: {error.strerror}"))
    return protocol.done


def xoauth2_response(username: str, token: str) -> bytes:
    """SASL XOAUTH2's client response, base64: "user=" user ^A "auth=Bearer " token ^A ^A."""
    raw = b"user=" + username.encode("utf-8") + b"\x01auth=Bearer " + token.encode("utf-8") + b"\x01\x01"
    return base64.b64encode(raw)


def xoauth2_error(challenge: str) -> str:
    """What the server's XOAUTH2 error (base64 JSON: status, schemes, scope) says, shortly."""
    try:
        details = json.loads(base64.b64decode(challenge, validate=True))
    except (binascii.Error, ValueError):
        return "the token was refused"
    if not isinstance(details, dict):
        return "the token was refused"
    status = str(details.get("status", "?"))[:40]
    scope = str(details.get("scope", ""))[:200]
    return f"the token was refused (status {status}" + (f", scope {scope})" if scope else ")")
