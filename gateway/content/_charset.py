"""Bytes to text as mail in the wild needs it: declared charsets, their aliases, and guesses.

Senders mislabel: GBK text goes out as ``gb2312``, Windows-1252 as ``iso-8859-1``,
HKSCS characters as ``big5``; some declare names no codec has, some declare nothing
and send 8-bit bytes. `decode_text` reads what is there and says what was wrong.

Undeclared 8-bit text is guessed by a small ordered trial rather than a statistical
detector: UTF-8 if it decodes strictly, else GB18030 or Big5-HKSCS if one of them
decodes strictly into mostly frequent Chinese characters (the two codecs accept many
of each other's byte pairs, so "decodes" alone is not enough: the sanity test is the
share of characters from GB2312 level 1 / the Big5 frequent area), else Windows-1252,
else Latin-1 (which cannot fail).
"""

from __future__ import annotations

import codecs
import contextlib
import re

__all__ = ["decode_text", "decode_words"]

# Names senders use -> the codecs that read what they actually send, widest first.
_ALIASES: dict[str, tuple[str, ...]] = {
    "gb2312": ("gb18030",),
    "gbk": ("gb18030",),
    "x-gbk": ("gb18030",),
    "cp936": ("gb18030",),
    "ms936": ("gb18030",),
    "windows-936": ("gb18030",),
    "euc-cn": ("gb18030",),
    "euccn": ("gb18030",),
    "x-euc-cn": ("gb18030",),
    "gb_2312-80": ("gb18030",),
    "csgb2312": ("gb18030",),
    "chinese": ("gb18030",),
    "gb18030": ("gb18030",),
    "hz-gb-2312": ("hz",),
    "big5": ("big5hkscs", "cp950"),
    "big-5": ("big5hkscs", "cp950"),
    "x-big5": ("big5hkscs", "cp950"),
    "cn-big5": ("big5hkscs", "cp950"),
    "csbig5": ("big5hkscs", "cp950"),
    "big5-hkscs": ("big5hkscs", "cp950"),
    "cp950": ("cp950", "big5hkscs"),
    # WHATWG: these labels mean Windows-1252 on the web and in mail clients.
    "iso-8859-1": ("cp1252", "latin-1"),
    "iso8859-1": ("cp1252", "latin-1"),
    "latin1": ("cp1252", "latin-1"),
    "latin-1": ("cp1252", "latin-1"),
    "l1": ("cp1252", "latin-1"),
    "windows-1252": ("cp1252", "latin-1"),
    "iso-8859-9": ("cp1254", "iso-8859-9"),
    "iso-8859-11": ("cp874", "iso-8859-11"),
    "tis-620": ("cp874",),
    "iso-8859-8-i": ("iso-8859-8",),
    "ks_c_5601-1987": ("cp949",),
    "euc-kr": ("cp949",),
    "shift_jis": ("cp932", "shift_jis"),
    "x-sjis": ("cp932", "shift_jis"),
    "iso-2022-jp": ("iso2022_jp_ext", "iso2022_jp_2"),
    "unicode-1-1-utf-7": ("utf-7",),
    "utf8": ("utf-8",),
}

# Labels that mean "we do not know": guessed without a defect.
_UNKNOWN = frozenset({"", "unknown", "unknown-8bit", "x-unknown", "default", "x-user-defined", "8bit"})

# Text codecs that are not charsets; a header naming one is not obeyed.
_NOT_CHARSETS = frozenset(
    {"idna", "punycode", "unicode_escape", "raw_unicode_escape", "undefined", "mbcs", "oem"}
)

_UTF8_EVIDENCE = 3  # non-ASCII characters that make valid UTF-8 win over a declared charset
_SAMPLE = 16384  # characters scored when guessing
_PUNCTUATION = re.compile("[\u3000-\u303f\uff01-\uff5e]")  # CJK and full-width punctuation


def _codecs_for(label: str) -> tuple[str, ...] | None:
    """The codecs to try for a declared label, or None if no codec has that name."""
    name = label.strip().strip("\"'").lower()
    if name in _ALIASES:
        return _ALIASES[name]
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError):
        return None
    if not getattr(info, "_is_text_encoding", True) or info.name.replace("-", "_") in _NOT_CHARSETS:
        return None
    return (info.name,)


def decode_text(raw: bytes, charset: str | None) -> tuple[str, tuple[str, ...]]:
    """`raw` as text, read with `charset` (None: undeclared) -> (text, defects)."""
    if raw.isascii():
        return raw.decode("ascii"), ()
    label = (charset or "").strip().strip("\"'").lower()
    if label in _UNKNOWN or label in ("us-ascii", "ascii", "us_ascii", "ansi_x3.4-1968"):
        return _guess(raw), ()
    tried = _codecs_for(label)
    if tried is None:
        return _guess(raw), (f"unknown charset {label[:40]!r}",)
    if tried[0] != "utf-8":
        # UTF-8 labelled as the sender's old local charset (common with gb2312): valid
        # UTF-8 with a few multi-byte characters is almost never anything else.
        with contextlib.suppress(UnicodeDecodeError):
            text = raw.decode("utf-8")
            if sum(1 for char in text[:64] if char > "\x7f") >= _UTF8_EVIDENCE:
                return text, (f"utf-8 text labelled {label[:40]!r}",)
    for codec in tried:
        try:
            return raw.decode(codec), ()
        except (UnicodeDecodeError, LookupError):
            continue
    # Declared, but the bytes are not in it: perhaps mislabelled UTF-8 (common), else
    # the declared charset with replacement characters.
    try:
        return raw.decode("utf-8"), (f"text not in its declared charset {label[:40]!r}",)
    except UnicodeDecodeError:
        pass
    return raw.decode(tried[0], "replace"), (f"undecodable text in charset {label[:40]!r}",)


def _guess(raw: bytes) -> str:
    """Undeclared 8-bit text: UTF-8, else the Chinese codec that reads sensibly, else 1252."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    best: tuple[float, str] | None = None
    for codec, frequent in (("gb18030", _GB_FREQUENT), ("big5hkscs", _BIG5_FREQUENT)):
        try:
            text = raw.decode(codec)
        except UnicodeDecodeError:
            continue
        score = _score(text, frequent)
        if score >= 0.5 and (best is None or score > best[0]):
            best = (score, text)
    if best is not None:
        return best[1]
    try:
        return raw.decode("cp1252")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _score(text: str, frequent: frozenset[str]) -> float:
    """The share of non-ASCII characters that are frequent in the guessed script."""
    wide = [char for char in text[:_SAMPLE] if char > "\x7f"]
    if not wide:
        return 0.0
    good = sum(1 for char in wide if char in frequent or _PUNCTUATION.match(char))
    return good / len(wide)


def _table(codec: str, leads: range, trails: tuple[range, ...]) -> frozenset[str]:
    chars: set[str] = set()
    for lead in leads:
        for trail_range in trails:
            for trail in trail_range:
                with contextlib.suppress(UnicodeDecodeError):
                    chars.add(bytes((lead, trail)).decode(codec))
    return frozenset(chars)


# GB2312 level 1 (the 3,755 frequent hanzi) and the Big5 frequent area (5,401 characters).
_GB_FREQUENT = _table("gb2312", range(0xB0, 0xD8), (range(0xA1, 0xFF),))
_BIG5_FREQUENT = _table("big5", range(0xA4, 0xC7), (range(0x40, 0x7F), range(0xA1, 0xFF)))

# RFC 2047 encoded word; the charset may carry an RFC 2231 language ("gb2312*zh").
_ENCODED_WORD = re.compile(r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([bBqQ])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(r"(\?=)[ \t\r\n]+(?==\?)")


def decode_words(value: str) -> tuple[str, tuple[str, ...]]:
    """A header value (or a name) with its encoded words and raw 8-bit bytes decoded."""
    defects: list[str] = []
    if any("\udc80" <= char <= "\udcff" for char in value):
        # Raw 8-bit bytes in a header arrive as surrogate escapes from the parser.
        text, found = decode_text(value.encode("ascii", "surrogateescape"), None)
        value = text
        defects.extend(found)
    if "=?" not in value:
        return value, tuple(defects)
    # Whitespace between two adjacent encoded words is not part of the text (RFC 2047 6.2).
    value = _BETWEEN_WORDS.sub(r"\1", value)

    def word(match: re.Match[str]) -> str:
        charset, encoding, encoded = match.group(1), match.group(2).lower(), match.group(3)
        raw = _word_bytes(encoded, encoding, defects)
        text, found = decode_text(raw, charset)
        defects.extend(found)
        return text

    return _ENCODED_WORD.sub(word, value), tuple(dict.fromkeys(defects))


def _word_bytes(encoded: str, encoding: str, defects: list[str]) -> bytes:
    import binascii

    data = encoded.encode("ascii", "surrogateescape")
    if encoding == "q":
        return binascii.a2b_qp(data, header=True)
    from gateway.content._mime import decode_base64

    raw, broken = decode_base64(data)
    if broken:
        defects.append("broken base64 in an encoded word")
    return raw
