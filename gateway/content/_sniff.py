"""What an attachment's first bytes say it is, whatever its name and declared type claim."""

from __future__ import annotations

__all__ = ["sniff_type"]

# (magic at offset 0, type). Only formats the content filters act on, and the common
# harmless ones so that a mismatch with the declared type can be seen.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"PK\x03\x04", "application/zip"),
    (b"PK\x05\x06", "application/zip"),  # empty archive
    (b"PK\x07\x08", "application/zip"),  # spanned archive
    (b"Rar!\x1a\x07", "application/vnd.rar"),
    (b"7z\xbc\xaf\x27\x1c", "application/x-7z-compressed"),
    (b"\x1f\x8b", "application/gzip"),
    (b"BZh", "application/x-bzip2"),
    (b"\xfd7zXZ\x00", "application/x-xz"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "application/x-ole-storage"),  # .doc .xls .msg
    (b"%PDF-", "application/pdf"),
    (b"{\\rtf", "application/rtf"),
    (b"MZ", "application/x-msdownload"),
    (b"\x7fELF", "application/x-executable"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"MSCF", "application/vnd.ms-cab-compressed"),
)


def sniff_type(payload: bytes) -> str | None:
    """The type the content's magic number names, or None when none is recognised."""
    for magic, content_type in _MAGIC:
        if payload.startswith(magic):
            return content_type
    if payload[:4] == b"RIFF" and payload[8:12] == b"WEBP":
        return "image/webp"
    if payload[257:262] == b"ustar":
        return "application/x-tar"
    return None
