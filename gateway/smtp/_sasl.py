"""SASL mechanisms for SMTP AUTH (RFC 4954): PLAIN, LOGIN and CRAM-MD5.

Each mechanism is a tiny state machine fed decoded client responses. It answers
with a `Challenge` to send, or an attempt (`PlainAttempt`, `CramAttempt`) for the
credentials to judge. A malformed response raises `SaslError`. Base64 and the
``*`` cancel are the server's business, not the mechanism's.
"""

from __future__ import annotations

import os

import attrs


class SaslError(ValueError):
    """The client's response does not fit the mechanism."""


@attrs.frozen
class Challenge:
    data: bytes


@attrs.frozen
class PlainAttempt:
    user: str
    password: str
    authzid: str = ""  # acting for someone else: not offered, the server refuses it


@attrs.frozen
class CramAttempt:
    user: str
    challenge: bytes
    digest: str


Step = Challenge | PlainAttempt | CramAttempt


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslError(f"{what} is not UTF-8") from None


class Plain:
    """RFC 4616: ``authzid NUL authcid NUL passwd``."""

    name = "PLAIN"

    def step(self, response: bytes | None) -> Step:
        if response is None:
            return Challenge(b"")
        parts = response.split(b"\x00")
        if len(parts) != 3:
            raise SaslError("PLAIN response must be authzid NUL user NUL password")
        authzid, user, password = (_text(part, "PLAIN response") for part in parts)
        if not user:
            raise SaslError("PLAIN response has no user name")
        return PlainAttempt(user, password, "" if authzid == user else authzid)


class Login:
    """The de-facto LOGIN mechanism (Outlook): ``Username:`` then ``Password:``."""

    name = "LOGIN"

    def __init__(self) -> None:
        self._user: str | None = None

    def step(self, response: bytes | None) -> Step:
        if response is None:
            return Challenge(b"Username:")
        if self._user is None:
            self._user = _text(response, "user name")
            if not self._user:
                raise SaslError("empty user name")
            return Challenge(b"Password:")
        return PlainAttempt(self._user, _text(response, "password"))


class CramMd5:
    """RFC 2195: the server sends a unique challenge, the client ``user hexdigest``."""

    name = "CRAM-MD5"

    def __init__(self, hostname: str, now: float) -> None:
        self.challenge = f"<{os.urandom(8).hex()}.{int(now)}@{hostname}>".encode("ascii", "replace")
        self._sent = False

    def step(self, response: bytes | None) -> Step:
        if not self._sent:
            if response is not None:
                raise SaslError("CRAM-MD5 takes no initial response")
            self._sent = True
            return Challenge(self.challenge)
        if response is None:
            raise SaslError("CRAM-MD5 needs a response")
        user, _, digest = _text(response, "CRAM-MD5 response").rpartition(" ")
        if not user or len(digest) != 32 or any(c not in "0123456789abcdefABCDEF" for c in digest):
            raise SaslError("CRAM-MD5 response must be user SP 32-hex-digest")
        return CramAttempt(user, self.challenge, digest)
