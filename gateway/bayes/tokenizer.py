"""The tokenizer: a parsed message -> the set of tokens the classifier weighs.

After SpamBayes's tokenizer, which was tuned on real mail: each token counts
once per message (a set, not a bag), and the tokens are

- body words: lower-cased runs of letters and digits, 3 to 12 characters;
  a longer one is a ``skip:<first letter> <length // 10 * 10>`` token (long
  words are mostly encoded junk, their shape is the clue, not their spelling),
  and an e-mail address is split into its name and domain parts;
- Chinese and Japanese text, which has no spaces: each run of Han, Hiragana
  or Katakana characters gives its character bigrams (a lone character itself),
  the method that works without a dictionary;
- URLs: ``proto:https``, the host and each parent domain (``url:example.com``),
  and the path's words (``url:click``);
- headers, prefixed with their name (``subject:free``, ``from:addr:example.com``,
  ``received:203.0.113``, ``content-type:text/html``). (SpamBayes's tokens for
  the mere presence of each header name were tried and left out: on the
  SpamAssassin corpus they raised false negatives from 20 to 27 of 945 and
  saved no false positive, learning how the corpus was collected.)
- attachments: their types and file-name extensions (``attachment:type:...``).

Text is folded with NFKC first, so full-width Latin (common in Chinese spam)
is the same word as ASCII. The gateway's own ``X-Mailgate-*`` headers and its
subject tag are left out: a message trained from the quarantine must not
teach the classifier what the classifier said about it.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Iterable, Iterator

from gateway.content import ParsedMessage

__all__ = ["DEFAULT_SUBJECT_PREFIX", "tokenize", "tokenize_headers", "tokenize_text"]

DEFAULT_SUBJECT_PREFIX = "SPAM*** "
MIN_WORD = 3
MAX_WORD = 12
# a huge body gives no more evidence after this much (and tokenizing it must stay quick:
# it runs on the reactor's thread, about 1 ms for a typical message)
MAX_TEXT = 200_000  # characters
MAX_TOKENS_FROM_TEXT = 20_000

# Han (with extensions and compatibility ideographs), Hiragana, Katakana (half-width too)
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f\U00020000-\U0002fa1f"
_CJK_RUN = re.compile(f"[{_CJK}]+")
_URL = re.compile(r"(https?|ftp)://([^\s/?#<>\"']+)([^\s<>\"']*)", re.IGNORECASE)
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
# a word: letters, digits and the punctuation that lives inside words ($100, e-mail, it's)
# (CJK punctuation and full-width forms end a word as a space does)
_WORD = re.compile(rf"[^\s{_CJK}\u3000-\u303f\uff00-\uff65\"()<>\[\]{{}},;:!?*=|\\/]+")
_TRIM = "'.-_#%&+~`^@"
_IPV4 = re.compile(r"\b(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})\b")
_HOST = re.compile(r"\b[a-z0-9-]+(?:\.[a-z0-9-]+)+\b")

# headers whose words are clues, by the prefix their tokens get
_WORD_HEADERS = {
    "subject": "subject",
    "x-mailer": "x-mailer",
    "user-agent": "x-mailer",
    "organization": "organization",
}
_ADDRESS_HEADERS = ("from", "reply-to", "sender", "return-path", "to", "cc")


def tokenize(message: ParsedMessage, subject_prefix: str = DEFAULT_SUBJECT_PREFIX) -> frozenset[str]:
    """Every token of a message (headers, text, attachments), each once.

    `subject_prefix` is the gateway's own subject tag, taken off the Subject
    before its words are read.
    """
    tokens: set[str] = set()
    tokens.update(tokenize_headers(message.headers, subject_prefix))
    tokens.update(tokenize_text(message.text))
    tokens.update(_attachment_tokens(message))
    return frozenset(tokens)


def tokenize_text(text: str) -> Iterator[str]:
    """The tokens of a body's text (words, CJK bigrams, URL pieces, address parts)."""
    text = unicodedata.normalize("NFKC", text[:MAX_TEXT])
    yield from itertools.islice(_text_tokens(text), MAX_TOKENS_FROM_TEXT)


def _text_tokens(text: str) -> Iterator[str]:
    for match in _URL.finditer(text):
        yield from _url_tokens(match.group(1), match.group(2), match.group(3))
    text = _URL.sub(" ", text)
    for match in _EMAIL.finditer(text):
        yield from _address_tokens("email", match.group(0))
    text = _EMAIL.sub(" ", text)
    yield from _words(text)


def _words(text: str, prefix: str = "") -> Iterator[str]:
    """Words and CJK bigrams, each with `prefix` in front ("subject:")."""
    for run in _CJK_RUN.findall(text):
        if len(run) == 1:
            yield prefix + run
        for start in range(len(run) - 1):
            yield prefix + run[start : start + 2]
    for raw in _WORD.findall(text):
        word = raw.strip(_TRIM).lower()
        if len(word) < MIN_WORD:
            continue
        if len(word) <= MAX_WORD:
            yield prefix + word
        elif not prefix:  # long words of the body: only their shape
            yield f"skip:{word[0]} {len(word) // 10 * 10}"
        else:
            yield prefix + word[:MAX_WORD]


def _url_tokens(scheme: str, host: str, rest: str) -> Iterator[str]:
    yield f"proto:{scheme.lower()}"
    host = host.rpartition("@")[2].partition(":")[0].lower().rstrip(".")
    if _IPV4.fullmatch(host):
        yield "url:ip-address"
    labels = host.split(".")
    for start in range(len(labels) - 1):  # www.example.com, example.com
        yield "url:" + ".".join(labels[start:])
    for piece in re.split(r"[/?#&=.%_+-]+", rest.lower()):
        if MIN_WORD <= len(piece) <= MAX_WORD:
            yield f"url:{piece}"
        elif len(piece) > MAX_WORD:
            yield f"url-skip:{len(piece) // 10 * 10}"


def _address_tokens(prefix: str, address: str) -> Iterator[str]:
    name, _, domain = address.lower().rpartition("@")
    if name:
        yield f"{prefix}name:{name}"
    labels = domain.split(".")
    for start in range(len(labels) - 1):
        yield f"{prefix}addr:" + ".".join(labels[start:])


def tokenize_headers(
    headers: Iterable[tuple[str, str]], subject_prefix: str = DEFAULT_SUBJECT_PREFIX
) -> Iterator[str]:
    """The tokens of a message's header (the gateway's own X-Mailgate-* fields left out)."""
    for name, raw_value in headers:
        field = name.lower()
        if field.startswith("x-mailgate-"):
            continue
        value = unicodedata.normalize("NFKC", raw_value)
        if field == "subject":
            if subject_prefix and value.startswith(subject_prefix):
                value = value[len(subject_prefix) :]
            yield from _words(value, "subject:")
            yield from _subject_shape(value)
        elif field in _WORD_HEADERS:
            yield from _words(value, _WORD_HEADERS[field] + ":")
        elif field in _ADDRESS_HEADERS:
            yield from _address_header(field, value)
        elif field == "received":
            yield from _received_tokens(value)
        elif field == "message-id":
            yield from _message_id_tokens(value)
        elif field in ("content-type", "content-transfer-encoding", "content-disposition"):
            yield from _content_tokens(field, value)


def _subject_shape(subject: str) -> Iterator[str]:
    """What a subject looks like, beyond its words: shouting, punctuation runs, length."""
    letters = [c for c in subject if c.isalpha() and c.isascii()]
    if len(letters) >= 8 and sum(c.isupper() for c in letters) > 0.8 * len(letters):
        yield "subject:shape:upper"
    for run in re.findall(r"[!?$]{2,}", subject):
        yield f"subject:shape:{run[:3]}"
    if not subject.strip():
        yield "subject:shape:empty"


def _address_header(field: str, value: str) -> Iterator[str]:
    addresses = _EMAIL.findall(value)
    prefix = "to" if field == "cc" else field
    if field in ("to", "cc"):
        yield f"{field}:count:{min(len(addresses), 10)}"
    else:
        for address in addresses[:3]:
            yield from _address_tokens(f"{prefix}:", address)
        display = _EMAIL.sub(" ", value)
        yield from _words(display, f"{prefix}:name:")
        if not addresses:
            yield f"{prefix}:none"
    if field in ("to", "cc"):
        for address in addresses[:5]:
            domain = address.rpartition("@")[2].lower()
            yield f"to:addr:{domain}"


def _received_tokens(value: str) -> Iterator[str]:
    lowered = value.lower()
    for match in _IPV4.finditer(lowered):
        parts = match.groups()
        yield "received:" + ".".join(parts[:3])  # the /24
        yield "received:" + ".".join(parts[:2])
    for host in _HOST.findall(lowered.split(";")[0]):
        if _IPV4.fullmatch(host):
            continue
        labels = host.split(".")
        if len(labels) >= 2:
            yield "received:" + ".".join(labels[-2:])
    for word in ("esmtp", "smtp", "lmtp", "http", "with local", "unknown"):
        if word in lowered:
            yield f"received:has:{word}"


def _message_id_tokens(value: str) -> Iterator[str]:
    _, at, domain = value.strip().strip("<>").rpartition("@")
    if not at:
        yield "message-id:invalid"
    elif _IPV4.fullmatch(domain.strip("[]")):
        yield "message-id:@ip"
    else:
        yield "message-id:@" + ".".join(domain.lower().split(".")[-2:])


def _content_tokens(field: str, value: str) -> Iterator[str]:
    main, _, parameters = value.partition(";")
    yield f"{field}:{main.strip().lower()}"
    for parameter in parameters.split(";"):
        key, _, setting = parameter.partition("=")
        key = key.strip().lower()
        if key in ("charset", "format", "type"):
            yield f"{field}:{key}:{setting.strip().strip(chr(34)).lower()[:24]}"


def _attachment_tokens(message: ParsedMessage) -> Iterator[str]:
    for attachment in message.attachments:
        yield f"attachment:type:{attachment.content_type}"
        name = (attachment.filename or "").lower()
        if "." in name:
            yield "attachment:ext:" + name.rpartition(".")[2][:10]
        elif name:
            yield "attachment:ext:none"
    if message.truncated:
        yield "message:truncated"
    for defect in message.defects[:5]:
        yield "defect:" + defect.split(":")[0][:40].lower()
