"""SMTP AUTH credentials: a file of hashed passwords, and the checks against it.

The credentials file has one ``user:{SCHEME}hash`` per line; blank lines and lines
starting with ``#`` are ignored. Schemes:

- ``{SCRYPT}$scrypt$ln=14,r=8,p=1$<salt>$<hash>`` (the default of `hash_password`);
- ``{PBKDF2-SHA256}$pbkdf2-sha256$i=600000$<salt>$<hash>``;
- ``{CRAM-MD5}<64 hex>``: Dovecot's precomputed HMAC-MD5 context (``doveadm pw -s
  CRAM-MD5``), the MD5 states after the key's opad and ipad blocks. It is
  plaintext-equivalent *for CRAM-MD5* (whoever holds it can log in with that
  mechanism), so CRAM-MD5 is offered only when some entry has this scheme, and such
  an entry also answers PLAIN/LOGIN (by recomputing the context from the password).

Salts and hashes are unpadded standard base64. Slow hashes run in the thread pool
given to `FileCredentials`, never on the reactor thread.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import os
import struct
from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")

SCHEMES = ("SCRYPT", "PBKDF2-SHA256", "CRAM-MD5")
SCRYPT_LOG_N = 14
SCRYPT_R = 8
SCRYPT_P = 1
PBKDF2_ITERATIONS = 600_000


class CredentialsError(ValueError):
    """A credentials file line that cannot be used; the message names the line."""


class ICredentials(Protocol):
    """What the SMTP server needs to check AUTH (structural: any object with these)."""

    @property
    def supports_cram_md5(self) -> bool:
        """Whether any user can log in with CRAM-MD5 (then it is advertised)."""

    def check_plain(self, user: str, password: str) -> Deferred[bool]:
        """Whether the password is right (PLAIN and LOGIN)."""

    def check_cram_md5(self, user: str, challenge: bytes, digest: str) -> Deferred[bool]:
        """Whether ``digest`` (hex) is HMAC-MD5(password, challenge) for this user."""


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def hash_password(password: str, scheme: str = "SCRYPT", *, cost: int | None = None) -> str:
    """The ``{SCHEME}...`` text for a credentials file (for ``mailgatectl passwd``).

    `cost` overrides the work factor: log2(N) for SCRYPT, iterations for PBKDF2.
    """
    secret = password.encode("utf-8")
    if scheme == "SCRYPT":
        salt = os.urandom(16)
        log_n = cost or SCRYPT_LOG_N
        digest = _scrypt(secret, salt, log_n, SCRYPT_R, SCRYPT_P)
        params = f"ln={log_n},r={SCRYPT_R},p={SCRYPT_P}"
        return f"{{SCRYPT}}$scrypt${params}${_b64(salt)}${_b64(digest)}"
    if scheme == "PBKDF2-SHA256":
        salt = os.urandom(16)
        iterations = cost or PBKDF2_ITERATIONS
        digest = hashlib.pbkdf2_hmac("sha256", secret, salt, iterations)
        params = f"i={iterations}"
        return f"{{PBKDF2-SHA256}}$pbkdf2-sha256${params}${_b64(salt)}${_b64(digest)}"
    if scheme == "CRAM-MD5":
        return "{CRAM-MD5}" + cram_md5_context(secret).hex()
    raise ValueError(f"unknown password scheme {scheme!r}; use one of {', '.join(SCHEMES)}")


def _scrypt(secret: bytes, salt: bytes, log_n: int, r: int, p: int, length: int = 32) -> bytes:
    n = 1 << log_n
    maxmem = 128 * n * r * 2 + 1024 * 1024
    return hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=length)


@attrs.frozen
class _SlowHash:
    scheme: str
    params: dict[str, int]
    salt: bytes
    digest: bytes


def _parse_slow_hash(stored: str) -> _SlowHash:
    """Split and range-check a SCRYPT / PBKDF2-SHA256 entry. Raises ValueError."""
    scheme, _, rest = stored.partition("}")
    scheme = scheme.lstrip("{")
    parts = rest.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != scheme.lower():
        raise ValueError(f"expected {{{scheme}}}${scheme.lower()}$params$salt$hash")
    try:
        params = {key: int(value) for key, _, value in (item.partition("=") for item in parts[2].split(","))}
        salt, digest = _unb64(parts[3]), _unb64(parts[4])
    except ValueError:
        raise ValueError("bad parameters, salt or hash encoding") from None
    if scheme == "SCRYPT":
        if set(params) != {"ln", "r", "p"}:
            raise ValueError("scrypt needs ln, r and p")
        if not (1 <= params["ln"] <= 20 and 1 <= params["r"] <= 32 and 1 <= params["p"] <= 16):
            raise ValueError("scrypt parameters out of range")
    elif scheme == "PBKDF2-SHA256":
        if set(params) != {"i"} or not 1 <= params["i"] <= 10_000_000:
            raise ValueError("pbkdf2 needs i= between 1 and 10000000")
    else:
        raise ValueError(f"unknown scheme {{{scheme}}}")
    if len(salt) < 8 or not 16 <= len(digest) <= 64:
        raise ValueError("salt or hash too short")
    return _SlowHash(scheme, params, salt, digest)


def verify_password(password: str, stored: str) -> bool:
    """Check a password against ``{SCHEME}...`` text; slow for SCRYPT/PBKDF2 (by design)."""
    secret = password.encode("utf-8")
    if stored.startswith("{CRAM-MD5}"):
        expected = stored[len("{CRAM-MD5}") :].lower()
        return hmac.compare_digest(cram_md5_context(secret).hex(), expected)
    entry = _parse_slow_hash(stored)
    if entry.scheme == "SCRYPT":
        params = entry.params
        actual = _scrypt(secret, entry.salt, params["ln"], params["r"], params["p"], len(entry.digest))
    else:
        actual = hashlib.pbkdf2_hmac("sha256", secret, entry.salt, entry.params["i"], len(entry.digest))
    return hmac.compare_digest(actual, entry.digest)


def check_stored(stored: str) -> None:
    """Raise ValueError if ``stored`` is not a usable ``{SCHEME}...`` entry (no hashing)."""
    scheme = stored[1 : stored.find("}")] if stored.startswith("{") else ""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {{{scheme}}}; use one of {', '.join(SCHEMES)}")
    if scheme == "CRAM-MD5":
        body = stored[len("{CRAM-MD5}") :]
        if len(body) != 64 or any(c not in "0123456789abcdefABCDEF" for c in body):
            raise ValueError("a {CRAM-MD5} entry is 64 hex digits")
        return
    _parse_slow_hash(stored)


# --- CRAM-MD5 from a stored HMAC-MD5 context (RFC 2104 section 4) ----------------

_MD5_SHIFTS = (7, 12, 17, 22) * 4 + (5, 9, 14, 20) * 4 + (4, 11, 16, 23) * 4 + (6, 10, 15, 21) * 4
_MD5_CONSTANTS = tuple(int(abs(math.sin(i + 1)) * 2**32) & 0xFFFFFFFF for i in range(64))
_MD5_INIT = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)


def _md5_compress(state: tuple[int, int, int, int], block: bytes) -> tuple[int, int, int, int]:
    """One MD5 compression (RFC 1321): hashlib cannot resume from a saved state."""
    words = struct.unpack("<16I", block)
    a, b, c, d = state
    for i in range(64):
        if i < 16:
            f, g = (b & c) | (~b & d), i
        elif i < 32:
            f, g = (d & b) | (~d & c), (5 * i + 1) % 16
        elif i < 48:
            f, g = b ^ c ^ d, (3 * i + 5) % 16
        else:
            f, g = c ^ (b | ~d), (7 * i) % 16
        f = (f + a + _MD5_CONSTANTS[i] + words[g]) & 0xFFFFFFFF
        a, d, c = d, c, b
        b = (b + ((f << _MD5_SHIFTS[i]) | (f >> (32 - _MD5_SHIFTS[i])))) & 0xFFFFFFFF
    return tuple(  # type: ignore[return-value]
        (x + y) & 0xFFFFFFFF for x, y in zip(state, (a, b, c, d), strict=True)
    )


def _md5_resume(state: tuple[int, int, int, int], done: int, data: bytes) -> bytes:
    """MD5 of (``done`` bytes that produced ``state``) + ``data``."""
    total = done + len(data)
    data += b"\x80" + b"\x00" * ((55 - total) % 64) + struct.pack("<Q", total * 8)
    for offset in range(0, len(data), 64):
        state = _md5_compress(state, data[offset : offset + 64])
    return struct.pack("<4I", *state)


def cram_md5_context(secret: bytes) -> bytes:
    """Dovecot's 32-byte CRAM-MD5 context: the opad state, then the ipad state."""
    if len(secret) > 64:
        secret = hashlib.md5(secret).digest()
    key = secret.ljust(64, b"\x00")
    outer = _md5_compress(_MD5_INIT, bytes(k ^ 0x5C for k in key))
    inner = _md5_compress(_MD5_INIT, bytes(k ^ 0x36 for k in key))
    return struct.pack("<4I", *outer) + struct.pack("<4I", *inner)


def cram_md5_digest(context: bytes, challenge: bytes) -> str:
    """HMAC-MD5(password, challenge) in hex, from the stored context alone."""
    outer = struct.unpack("<4I", context[:16])
    inner = struct.unpack("<4I", context[16:32])
    inner_digest = _md5_resume(inner, 64, challenge)
    return _md5_resume(outer, 64, inner_digest).hex()


# --- the credentials file -------------------------------------------------------------

# checked for unknown users so that a wrong user name costs as much as a wrong password
_DUMMY = "{PBKDF2-SHA256}$pbkdf2-sha256$i=600000$AAAAAAAAAAAAAAAAAAAAAA$" + _b64(bytes(32))


class FileCredentials:
    """Users and hashed passwords from a credentials file (see the module docstring).

    `threadpool` runs the slow hashes; pass a small dedicated, started pool (the
    composition root owns its life). With ``None`` the hashes run inline, which is
    for tests and tools only: a slow hash blocks the reactor.
    """

    def __init__(
        self,
        entries: dict[str, str],
        *,
        reactor: IReactorFromThreads | None = None,
        threadpool: ThreadPool | None = None,
    ) -> None:
        if threadpool is not None and reactor is None:
            raise ValueError("a threadpool needs the reactor to report back to")
        self._entries = dict(entries)
        self._reactor = reactor
        self._threadpool = threadpool

    @classmethod
    def parse(
        cls, lines: Iterable[str], *, source: str = "<credentials>", **kwargs: object
    ) -> FileCredentials:
        """Read ``user:{SCHEME}hash`` lines; `CredentialsError` names a bad line."""
        entries: dict[str, str] = {}
        for number, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            user, colon, stored = line.partition(":")
            where = f"{source}, line {number}"
            if not colon or not user or not stored:
                raise CredentialsError(f"{where}: expected user:{{SCHEME}}hash")
            if user in entries:
                raise CredentialsError(f"{where}: user {user!r} is listed twice")
            try:
                check_stored(stored)
            except ValueError as error:
                raise CredentialsError(f"{where}: {error}") from None
            entries[user] = stored
        return cls(entries, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def from_file(cls, path: str, **kwargs: object) -> FileCredentials:
        with open(path, encoding="utf-8") as lines:
            return cls.parse(lines, source=path, **kwargs)

    @property
    def supports_cram_md5(self) -> bool:
        return any(stored.startswith("{CRAM-MD5}") for stored in self._entries.values())

    def check_plain(self, user: str, password: str) -> Deferred[bool]:
        stored = self._entries.get(user)
        if stored is None:
            return self._run(lambda: verify_password(password, _DUMMY) and False)
        if stored.startswith("{CRAM-MD5}"):
            return succeed(verify_password(password, stored))  # fast: two MD5 blocks
        return self._run(lambda: verify_password(password, stored))

    def check_cram_md5(self, user: str, challenge: bytes, digest: str) -> Deferred[bool]:
        stored = self._entries.get(user, "")
        if not stored.startswith("{CRAM-MD5}"):
            return succeed(False)
        expected = cram_md5_digest(bytes.fromhex(stored[len("{CRAM-MD5}") :]), challenge)
        return succeed(hmac.compare_digest(expected, digest.lower()))

    def _run(self, check: Callable[[], T]) -> Deferred[T]:
        if self._threadpool is None or self._reactor is None:
            return succeed(check())
        return deferToThreadPool(self._reactor, self._threadpool, check)
