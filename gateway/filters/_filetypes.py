"""What a file is, from its first bytes and from its name, for the "attachments" filter.

`sniff` reads magic numbers (a small table of our own: executables, archives,
Office containers, a few harmless formats), so that a Windows program named
``photo.jpg`` is known for what it is. `extensions` reads a name the way
Windows would (trailing dots and blanks dropped, case folded) and
`double_extension` and `disguised_name` catch the usual tricks:
``invoice.pdf.exe``, ``invoice.pdf      .exe``, a right-to-left override.
"""

from __future__ import annotations

import unicodedata

# the first bytes a program needs to see (an ISO 9660 image is recognised at 32 KiB + 1)
HEAD = 0x8006

# (offset, magic, type); first match wins, so longer magics that share a prefix come first
_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"MZ", "pe"),  # DOS/Windows executables, DLLs, .scr, .cpl, .sys
    (0, b"\x7fELF", "elf"),
    (0, b"\xfe\xed\xfa\xce", "mach-o"),
    (0, b"\xfe\xed\xfa\xcf", "mach-o"),
    (0, b"\xce\xfa\xed\xfe", "mach-o"),
    (0, b"\xcf\xfa\xed\xfe", "mach-o"),
    (0, b"\xca\xfe\xba\xbe", "mach-o"),  # a universal binary (or a Java class: both are code)
    (0, b"\x4c\x00\x00\x00\x01\x14\x02\x00", "lnk"),  # a Windows shortcut
    (0, b"#!", "script"),
    (0, b"PK\x03\x04", "zip"),
    (0, b"PK\x05\x06", "zip"),  # an empty zip
    (0, b"Rar!\x1a\x07", "rar"),
    (0, b"7z\xbc\xaf\x27\x1c", "7z"),
    (0, b"\x1f\x8b", "gzip"),
    (0, b"BZh", "bzip2"),
    (0, b"\xfd7zXZ\x00", "xz"),
    (0, b"MSCF", "cab"),
    (0, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "ole"),  # .doc .xls .ppt .msi .msg
    (0, b"%PDF-", "pdf"),
    (0, b"{\\rtf", "rtf"),
    (0, b"\x89PNG\r\n\x1a\n", "png"),
    (0, b"\xff\xd8\xff", "jpeg"),
    (0, b"GIF87a", "gif"),
    (0, b"GIF89a", "gif"),
    (0x8001, b"CD001", "iso"),
)

KNOWN_TYPES = frozenset(kind for _, _, kind in _MAGIC)

# types whose content is an archive the filter lists (ooxml, a zip too, is a document)
ARCHIVE_TYPES = frozenset({"zip", "rar", "7z"})

# names Windows (and Outlook, Gmail) treat as programs: Gmail's blocked list
DEFAULT_BLOCKED_EXTENSIONS = (
    "ade", "adp", "apk", "appx", "appxbundle", "bat", "cab", "chm", "cmd", "com", "cpl",
    "diagcab", "diagcfg", "diagpkg", "dll", "dmg", "ex", "ex_", "exe", "hta", "img", "ins",
    "iso", "isp", "jar", "jnlp", "js", "jse", "lib", "lnk", "mde", "mjs", "msc", "msi", "msix",
    "msixbundle", "msp", "mst", "nsh", "pif", "ps1", "scr", "sct", "shb", "sys", "vb", "vbe",
    "vbs", "vhd", "vxd", "wsc", "wsf", "wsh", "xll",
)  # fmt: skip

DEFAULT_BLOCKED_TYPES = ("pe", "elf", "mach-o", "lnk")

# what a double extension hides behind: names people open without a second thought
_DECOY_EXTENSIONS = frozenset(
    {
        "pdf", "doc", "docx", "xls", "xlsx", "ppt", "pptx", "odt", "ods", "rtf", "txt", "csv", "jpg",
        "jpeg", "png", "gif", "bmp", "tif", "tiff", "mp3", "mp4", "wav", "avi", "mov", "zip", "rar",
        "7z", "htm", "html", "eml"
    }
)  # fmt: skip
# what it hides: programs and scripts, whatever the administrator blocks
_EXECUTABLE_EXTENSIONS = frozenset(
    {
        "exe", "com", "scr", "pif", "bat", "cmd", "cpl", "msi", "js", "jse", "vbs", "vbe", "wsf", "wsh",
        "hta", "lnk", "ps1", "jar", "sh", "app"
    }
)  # fmt: skip

# Office names oletools is asked about even when the magic says plain zip or nothing
OFFICE_EXTENSIONS = frozenset(
    {
        "doc", "dot", "docm", "dotm", "docx", "xls", "xlt", "xlsm", "xltm", "xlsb", "xla", "xlam",
        "xlsx", "ppt", "pot", "pps", "pptm", "potm", "ppsm", "pptx", "ppam", "sldm"
    }
)  # fmt: skip

_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")


def sniff(head: bytes) -> str | None:
    """The type of a file from its first bytes (see `HEAD`), or None when unknown."""
    for offset, magic, kind in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return kind
    return None


def clean_name(name: str) -> str:
    """A name as Windows opens it: the last path part, no trailing dots or blanks, case folded."""
    name = unicodedata.normalize("NFKC", name)
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch not in _BIDI_CONTROLS and ch != "\x00")
    return name.rstrip(". \t").casefold()


def extensions(name: str) -> tuple[str, ...]:
    """The extensions of a name, outermost last ("a.pdf.exe" -> ("pdf", "exe")); blanks stripped."""
    parts = clean_name(name).split(".")[1:]
    return tuple(part.strip() for part in parts if part.strip())


def extension(name: str) -> str:
    found = extensions(name)
    return found[-1] if found else ""


def double_extension(name: str) -> bool:
    """``invoice.pdf.exe``: a program named as a document (the last two extensions)."""
    found = extensions(name)
    return len(found) >= 2 and found[-1] in _EXECUTABLE_EXTENSIONS and found[-2] in _DECOY_EXTENSIONS


def disguised_name(name: str) -> bool:
    """A name that shows differently from what it is: bidirectional controls (``gpj.exe`` shown
    as ``exe.jpg``), or a run of blanks pushing the real extension out of sight."""
    return any(ch in _BIDI_CONTROLS for ch in name) or "          " in name


def describe_type(kind: str) -> str:
    return {
        "pe": "a Windows program",
        "elf": "a Linux program",
        "mach-o": "a macOS program",
        "lnk": "a Windows shortcut",
        "script": "a script",
        "iso": "a disk image",
        "ole": "an OLE2 (Office or installer) file",
        "ooxml": "an Office document",
    }.get(kind, kind)
