"""RFC 5321 paths and ESMTP parameters of MAIL FROM / RCPT TO, as pure functions.

Nothing here touches the network: the server hands in the text after ``FROM:`` or
``TO:`` and gets back an address and typed parameters, or a `CommandError` whose
`Reply` is what the client should hear.

Grammar (RFC 5321 4.1.2, RFC 6531 for UTF-8, RFC 3461 for DSN, RFC 1870, 6152, 3030):

- a path is always in angle brackets; a source route (``<@a,@b:user@c>``) is parsed
  and discarded (RFC 5321 C);
- a local part is a dot-string or a quoted string; a domain is LDH labels or an
  address literal ``[192.0.2.1]`` / ``[IPv6:2001:db8::1]``;
- non-ASCII (UTF-8) is accepted in local parts and domains only when the
  transaction declared SMTPUTF8;
- ``RCPT TO:<postmaster>`` (no domain) is accepted, as RFC 5321 requires.
"""

from __future__ import annotations

import ipaddress
import re

import attrs

from gateway.model import Body, Notify, Recipient, Ret
from gateway.smtp.reply import Reply


class CommandError(Exception):
    """A client error with the reply that explains it."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def _error(code: int, enhanced: str, text: str) -> CommandError:
    return CommandError(Reply(code, enhanced, text))


_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_DOT_STRING = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*\Z")
_DOT_STRING_UTF8 = re.compile(rf"[{_ATEXT}\u0080-\U0010ffff]+(?:\.[{_ATEXT}\u0080-\U0010ffff]+)*\Z")
# qtextSMTP / quoted-pairSMTP (RFC 5321 4.1.2), with UTF-8 allowed by RFC 6531
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"\Z')
_QUOTED_UTF8 = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"\Z')
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_LABEL_UTF8 = re.compile(
    r"[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\u0080-\U0010ffff-]*[A-Za-z0-9\u0080-\U0010ffff])?\Z"
)
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+\Z")
_VALUE_UTF8 = re.compile(r"[\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+\Z")
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-Fa-f]{2})*\Z")
_SIZE = re.compile(r"[0-9]{1,20}\Z")

MAX_DOMAIN = 255
MAX_ENVID = 100  # RFC 3461 4.4


def is_ascii(text: str) -> bool:
    return text.isascii()


def parse_domain(domain: str, *, utf8: bool = False) -> str:
    """Check a domain or address literal; return it unchanged. Raises ValueError."""
    if domain.startswith("["):
        return _parse_literal(domain)
    if not domain or len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise ValueError("bad domain length")
    label = _LABEL_UTF8 if utf8 else _LABEL
    for part in domain.split("."):
        if not label.match(part):  # ASCII labels: 63 octets at most, by the regex
            raise ValueError(f"bad domain label {part!r}")
    return domain


def _parse_literal(literal: str) -> str:
    if not literal.endswith("]"):
        raise ValueError("unterminated address literal")
    inner = literal[1:-1]
    if inner[:5].lower() == "ipv6:":
        ipaddress.IPv6Address(inner[5:])  # raises ValueError
        return literal
    if not re.fullmatch(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}", inner):
        # General-address-literal (a standardized tag) names no transport we have
        raise ValueError("unsupported address literal")
    ipaddress.IPv4Address(inner)
    return literal


def parse_mailbox(text: str, *, utf8: bool = False) -> str:
    """Check ``local@domain`` (RFC 5321 Mailbox); return it. Raises ValueError."""
    if not utf8 and not text.isascii():
        raise ValueError("non-ASCII address without SMTPUTF8")
    if text.startswith('"'):
        # the quoted local part may contain "@"; find its closing quote
        end = 1
        while end < len(text):
            char = text[end]
            if char == "\\":
                end += 2
                continue
            if char == '"':
                break
            end += 1
        local, at, domain = text[: end + 1], text[end + 1 : end + 2], text[end + 2 :]
        if at != "@" or not (_QUOTED_UTF8 if utf8 else _QUOTED).match(local):
            raise ValueError("bad quoted local part")
    else:
        local, at, domain = text.rpartition("@")
        if not at or not (_DOT_STRING_UTF8 if utf8 else _DOT_STRING).match(local):
            raise ValueError("bad local part")
    parse_domain(domain, utf8=utf8)
    return text


def split_path(argument: str) -> tuple[str, str]:
    """Split ``<path> params`` into the path's inside and the parameter text."""
    argument = argument.lstrip(" ")
    if not argument.startswith("<"):
        raise ValueError("path must be in angle brackets")
    # '>' may appear inside a quoted local part; scan with quotes in mind
    quoted = False
    index = 1
    while index < len(argument):
        char = argument[index]
        if quoted and char == "\\":
            index += 2
            continue
        if char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            rest = argument[index + 1 :]
            if rest and not rest.startswith(" "):
                raise ValueError("junk after path")
            return argument[1:index], rest.strip(" ")
        index += 1
    raise ValueError("unterminated path")


def strip_source_route(path: str) -> str:
    """Drop an obsolete A-d-l source route (``@a,@b:``); RFC 5321 C says ignore it."""
    if not path.startswith("@"):
        return path
    route, colon, mailbox = path.partition(":")
    if not colon:
        raise ValueError("bad source route")
    for hop in route.split(","):
        if not hop.startswith("@"):
            raise ValueError("bad source route")
        parse_domain(hop[1:])
    return mailbox


def parse_params(text: str, *, utf8: bool = False) -> dict[str, str | None]:
    """``KEY=value KEY2`` into {"KEY": "value", "KEY2": None}; keys upper-cased."""
    params: dict[str, str | None] = {}
    for item in text.split(" "):
        if not item:
            continue
        keyword, equals, value = item.partition("=")
        if not _KEYWORD.match(keyword):
            raise _error(501, "5.5.4", f"Bad parameter syntax: {item[:40]}")
        if equals and not (_VALUE_UTF8 if utf8 else _VALUE).match(value):
            raise _error(501, "5.5.4", f"Bad parameter value: {keyword[:40]}")
        keyword = keyword.upper()
        if keyword in params:
            raise _error(501, "5.5.4", f"Duplicate parameter: {keyword}")
        params[keyword] = value if equals else None
    return params


def xtext_decode(text: str) -> str:
    """RFC 3461 4: ``+XX`` hex escapes to characters. Raises ValueError."""
    if not _XTEXT.match(text):
        raise ValueError("bad xtext")
    if "+" not in text:
        return text
    return re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), text)


def xtext_encode(text: str) -> str:
    """The inverse of `xtext_decode`, for the client side (non-ASCII as UTF-8 octets)."""
    out = []
    for byte in text.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


@attrs.frozen
class MailFrom:
    """A parsed MAIL FROM: the sender and the transaction parameters."""

    sender: str  # "" for the null sender
    size: int | None = None
    body: Body = Body.SEVEN_BIT
    smtputf8: bool = False
    ret: Ret | None = None
    envid: str | None = None
    auth: str | None = None


def parse_mail_from(argument: str, *, esmtp: bool = True) -> MailFrom:
    """The text after ``MAIL FROM:``. Raises `CommandError`."""
    try:
        path, param_text = split_path(argument)
    except ValueError as error:
        raise _error(501, "5.5.2", f"Syntax: MAIL FROM:<address> ({error})") from None
    if param_text and not esmtp:
        raise _error(555, "5.5.4", "MAIL parameters need EHLO")
    params = parse_params(param_text, utf8=True)
    result = MailFrom(sender="")
    for keyword, value in params.items():
        result = _mail_param(result, keyword, value)
    try:
        sender = strip_source_route(path) if path else ""
        if sender:
            parse_mailbox(sender, utf8=result.smtputf8)
    except ValueError:
        if not result.smtputf8 and not path.isascii():
            raise _error(553, "5.6.7", "Non-ASCII sender address needs SMTPUTF8") from None
        raise _error(501, "5.1.7", "Bad sender address syntax") from None
    if not result.smtputf8:
        for value in params.values():
            if value is not None and not value.isascii():
                raise _error(501, "5.5.4", "Non-ASCII parameter needs SMTPUTF8")
    return attrs.evolve(result, sender=sender)


def _mail_param(result: MailFrom, keyword: str, value: str | None) -> MailFrom:
    if keyword == "SIZE":
        if value is None or not _SIZE.match(value):
            raise _error(501, "5.5.4", "Bad SIZE parameter")
        return attrs.evolve(result, size=int(value))
    if keyword == "BODY":
        try:
            body = Body((value or "").upper())
        except ValueError:
            raise _error(501, "5.5.4", "BODY must be 7BIT, 8BITMIME or BINARYMIME") from None
        return attrs.evolve(result, body=body)
    if keyword == "SMTPUTF8":
        if value is not None:
            raise _error(501, "5.5.4", "SMTPUTF8 takes no value")
        return attrs.evolve(result, smtputf8=True)
    if keyword == "RET":
        try:
            ret = Ret((value or "").upper())
        except ValueError:
            raise _error(501, "5.5.4", "RET must be FULL or HDRS") from None
        return attrs.evolve(result, ret=ret)
    if keyword == "ENVID":
        envid = _xtext_param(keyword, value)
        if len(envid) > MAX_ENVID or not envid.isprintable() or not envid.isascii():
            raise _error(501, "5.5.4", "Bad ENVID parameter")
        return attrs.evolve(result, envid=envid)
    if keyword == "AUTH":
        # RFC 4954 5: accepted and stored; trusting it is the reception's business
        return attrs.evolve(result, auth=_xtext_param(keyword, value))
    raise _error(555, "5.5.4", f"Unsupported MAIL parameter: {keyword[:40]}")


def _xtext_param(keyword: str, value: str | None) -> str:
    try:
        if value is None:
            raise ValueError("missing")
        return xtext_decode(value)
    except ValueError:
        raise _error(501, "5.5.4", f"Bad {keyword} parameter (xtext)") from None


def parse_rcpt_to(argument: str, *, utf8: bool = False, esmtp: bool = True) -> Recipient:
    """The text after ``RCPT TO:``. `utf8` is whether MAIL FROM said SMTPUTF8."""
    try:
        path, param_text = split_path(argument)
    except ValueError as error:
        raise _error(501, "5.5.2", f"Syntax: RCPT TO:<address> ({error})") from None
    if param_text and not esmtp:
        raise _error(555, "5.5.4", "RCPT parameters need EHLO")
    try:
        address = strip_source_route(path)
        if address.lower() != "postmaster":
            parse_mailbox(address, utf8=utf8)
    except ValueError:
        if not utf8 and not path.isascii():
            raise _error(553, "5.6.7", "Non-ASCII recipient address needs SMTPUTF8") from None
        raise _error(501, "5.1.3", "Bad recipient address syntax") from None
    recipient = Recipient(address)
    for keyword, value in parse_params(param_text, utf8=utf8).items():
        if keyword == "NOTIFY":
            recipient = attrs.evolve(recipient, notify=_parse_notify(value))
        elif keyword == "ORCPT":
            recipient = attrs.evolve(recipient, orcpt=_parse_orcpt(value))
        else:
            raise _error(555, "5.5.4", f"Unsupported RCPT parameter: {keyword[:40]}")
    return recipient


def _parse_notify(value: str | None) -> frozenset[Notify]:
    try:
        notify = frozenset(Notify(item.upper()) for item in (value or "").split(","))
    except ValueError:
        raise _error(501, "5.5.4", "NOTIFY must be NEVER or SUCCESS,FAILURE,DELAY") from None
    if Notify.NEVER in notify and len(notify) > 1:
        raise _error(501, "5.5.4", "NOTIFY=NEVER excludes other values")
    return notify


def _parse_orcpt(value: str | None) -> str:
    addr_type, semicolon, rest = (value or "").partition(";")
    if not semicolon or not _KEYWORD.match(addr_type) or not rest:
        raise _error(501, "5.5.4", "Bad ORCPT parameter")
    return f"{addr_type};{_xtext_param('ORCPT', rest)}"
