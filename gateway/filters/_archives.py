"""Looking inside archives without unpacking them: zip, 7z and RAR, nested, within limits.

`list_archive` walks an attachment that is an archive and returns its members
(path, declared size, type sniffed from their first bytes, encrypted or not)
and what was wrong (`Trouble`): an encrypted archive or member, a "zip bomb",
an archive that cannot be read. Nothing is written to disk; members are read
in memory, and only the first bytes of each unless it is itself an archive (or
an Office document, for the macro check), which is then walked in turn.

The limits (`ArchiveLimits`) hold for the whole walk, every level together:
depth, member count, total uncompressed size, and the ratio of uncompressed to
compressed size (as ClamAV's heuristics). They are checked against the sizes
the archive *declares* before anything is decompressed, so a bomb is refused
without being unpacked; reading is then bounded by those declared sizes (zip
and 7z stop there; a member longer than it said is a bomb too). Zip entries
that overlap each other (the non-recursive bomb) are refused the same way.

Formats: zip with the standard library; 7z with py7zr; RAR with rarfile, which
reads RAR headers itself, so names, sizes and encryption are always seen, but
the content of a *compressed* RAR member needs the non-free unrar program: such
members are judged by their names only, and one that is an archive or an
Office document by name is reported unreadable. A broken archive is a
`Trouble` of its own, never an exception; an exception that is not about the
archive's bytes (a bug) is raised for the chain runner to handle.
"""

from __future__ import annotations

import enum
import io
import itertools
import lzma
import struct
import zipfile
import zlib
from collections.abc import Iterator
from typing import Any

import attrs
import py7zr
import py7zr.exceptions
import py7zr.io
import rarfile

from gateway.filters._filetypes import ARCHIVE_TYPES, OFFICE_EXTENSIONS, extension, sniff

SMALL_HEAD = 4096  # bytes read from each member to sniff its type
# what a member's name says it is, when its bytes cannot be read
_ARCHIVE_EXTENSIONS = frozenset({"zip", "rar", "7z", "jar"})


@attrs.frozen
class ArchiveLimits:
    """How far the walk goes; beyond any of these the archive is a bomb."""

    max_depth: int = 3  # archives inside the attachment's archive (1: no nesting allowed)
    max_files: int = 1000  # members, every level together
    max_total_size: int = 100 * 1024 * 1024  # declared uncompressed bytes, every level together
    max_ratio: int = 100  # uncompressed / compressed, of one member or a whole archive
    ratio_min_size: int = 1024 * 1024  # smaller members are not judged by their ratio


class Problem(enum.Enum):
    ENCRYPTED = "encrypted"
    BOMB = "bomb"
    UNREADABLE = "unreadable"


@attrs.frozen
class Member:
    """A file inside an archive, as far as the walk could see it."""

    path: str  # "outer.zip/inner.zip/evil.exe"
    name: str  # its name in its archive
    size: int  # declared uncompressed size
    kind: str | None = None  # sniffed from its bytes (None: unknown or not read)
    encrypted: bool = False
    content: bytes | None = attrs.field(default=None, repr=False, eq=False)  # whole, when kept


@attrs.frozen
class Trouble:
    problem: Problem
    path: str
    detail: str


@attrs.frozen
class Listing:
    members: tuple[Member, ...]
    troubles: tuple[Trouble, ...]


class _Bomb(Exception):
    """A limit was crossed: the archive is refused as a whole."""


# what reading hostile bytes raises in zipfile, py7zr and rarfile: the archive is broken
_BROKEN: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    NotImplementedError,  # an unsupported compression method
    EOFError,
    zlib.error,
    lzma.LZMAError,
    struct.error,
    ValueError,
    OSError,  # bz2 and others report bad data as OSError
    UnicodeDecodeError,
    KeyError,
    IndexError,
    OverflowError,
    py7zr.exceptions.ArchiveError,
    rarfile.Error,
)


def keep_content(name: str, kind: str | None) -> bool:
    """Whether a member is read whole: an archive to walk, or an Office file to check for macros."""
    return kind in ARCHIVE_TYPES or kind == "ole" or extension(name) in OFFICE_EXTENSIONS


def zip_kind(payload: bytes) -> str:
    """ "ooxml" for a zip that is an Office document ([Content_Types].xml), else "zip"."""
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            names = archive.namelist()
    except _BROKEN:
        return "zip"
    return "ooxml" if "[Content_Types].xml" in names else "zip"


def list_archive(path: str, kind: str, payload: bytes, limits: ArchiveLimits = ArchiveLimits()) -> Listing:
    """Walk the archive `payload` (sniffed as `kind`: zip, ooxml, 7z or rar) named `path`.

    For "ooxml" (an Office document, a zip inside) only the bomb checks run:
    its parts are not members a recipient would open.
    """
    walk = _Walk(limits)
    walk.archive(path, kind, payload, 1)
    return Listing(tuple(walk.members), tuple(walk.troubles))


class _Walk:
    def __init__(self, limits: ArchiveLimits) -> None:
        self.limits = limits
        self.files = 0
        self.total = 0
        self.members: list[Member] = []
        self.troubles: list[Trouble] = []

    def archive(self, path: str, kind: str, payload: bytes, depth: int) -> None:
        reader = {"zip": self._zip, "ooxml": self._zip, "7z": self._sevenzip, "rar": self._rar}[kind]
        found: list[Member] = []
        try:
            for member in reader(path, kind, payload):
                found.append(member)
        except _Bomb as bomb:
            self.troubles.append(Trouble(Problem.BOMB, path, str(bomb)))
            return
        except _BROKEN as error:
            self.troubles.append(Trouble(Problem.UNREADABLE, path, _describe(error)))
            return
        finally:
            self.members.extend(found)
        for member in found:
            if member.encrypted:
                self.troubles.append(Trouble(Problem.ENCRYPTED, member.path, "encrypted"))
            elif member.kind in ARCHIVE_TYPES and member.content is not None:
                if depth >= self.limits.max_depth:
                    detail = f"archives nested deeper than {self.limits.max_depth}"
                    self.troubles.append(Trouble(Problem.BOMB, member.path, detail))
                    continue
                nested = zip_kind(member.content) if member.kind == "zip" else member.kind
                self.archive(member.path, nested, member.content, depth + 1)
            elif member.content is None and not member.encrypted and _named_container(member.name):
                self.troubles.append(
                    Trouble(Problem.UNREADABLE, member.path, "its content cannot be read (compressed RAR)")
                )

    # --- the budget ---------------------------------------------------------------

    def _count(self, number: int) -> None:
        self.files += number
        if self.files > self.limits.max_files:
            raise _Bomb(f"more than {self.limits.max_files} files")

    def _grow(self, declared: int) -> None:
        self.total += declared
        if self.total > self.limits.max_total_size:
            raise _Bomb(f"more than {_size(self.limits.max_total_size)} uncompressed")

    def _ratio(self, uncompressed: int, compressed: int, what: str) -> None:
        limits = self.limits
        if uncompressed >= limits.ratio_min_size and uncompressed > limits.max_ratio * max(compressed, 1):
            ratio = uncompressed / max(compressed, 1)
            raise _Bomb(f"{what} compressed {ratio:.0f} to 1 (more than {limits.max_ratio} to 1)")

    # --- formats ------------------------------------------------------------------

    def _zip(self, path: str, kind: str, payload: bytes) -> Iterator[Member]:
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            infos = archive.infolist()
            self._count(len(infos))
            self._grow(sum(info.file_size for info in infos))
            self._ratio(sum(info.file_size for info in infos), len(payload), "the archive is")
            _check_overlaps(infos)
            for info in infos:
                self._ratio(info.file_size, info.compress_size, f"{info.filename} is")
            if kind == "ooxml":
                return  # a document: the bomb checks only
            for info in infos:
                if info.is_dir():
                    continue
                member_path = f"{path}/{info.filename}"
                if info.flag_bits & 0x1:  # encrypted (ZipCrypto or AES)
                    yield Member(member_path, info.filename, info.file_size, encrypted=True)
                    continue
                with archive.open(info) as stream:
                    head = stream.read(SMALL_HEAD)
                    kind_found = sniff(head)
                    content = head + stream.read() if keep_content(info.filename, kind_found) else None
                yield Member(member_path, info.filename, info.file_size, kind_found, False, content)

    def _sevenzip(self, path: str, kind: str, payload: bytes) -> Iterator[Member]:
        try:
            archive = py7zr.SevenZipFile(io.BytesIO(payload), mode="r")
        except py7zr.exceptions.PasswordRequired:
            self.troubles.append(Trouble(Problem.ENCRYPTED, path, "encrypted (names and all)"))
            return
        with archive:
            infos = [info for info in archive.list() if not info.is_directory]
            self._count(len(infos))
            declared = sum(info.uncompressed for info in infos)
            self._grow(declared)
            self._ratio(declared, len(payload), "the archive is")
            if archive.needs_password():
                for info in infos:
                    yield Member(f"{path}/{info.filename}", info.filename, info.uncompressed, encrypted=True)
                return
            sink = _SevenZipSink(declared)
            archive.extract(factory=sink)
        for info in infos:
            written = sink.products.get(info.filename)
            head = written.head() if written is not None else b""
            kind_found = sniff(head)
            content = (
                written.whole() if written is not None and keep_content(info.filename, kind_found) else None
            )
            yield Member(
                f"{path}/{info.filename}", info.filename, info.uncompressed, kind_found, False, content
            )

    def _rar(self, path: str, kind: str, payload: bytes) -> Iterator[Member]:
        with rarfile.RarFile(io.BytesIO(payload)) as archive:
            infos = [info for info in archive.infolist() if not info.is_dir()]
            if not infos and archive.needs_password():
                self.troubles.append(Trouble(Problem.ENCRYPTED, path, "encrypted (names and all)"))
                return
            if not infos:
                # rarfile stops quietly at a header it cannot parse; an empty RAR is not mail
                raise rarfile.BadRarFile("no file could be read from it")
            self._count(len(infos))
            self._grow(sum(info.file_size or 0 for info in infos))
            for info in infos:
                self._ratio(info.file_size or 0, info.compress_size or 0, f"{info.filename} is")
            for info in infos:
                name = info.filename or ""
                member_path = f"{path}/{name}"
                if info.needs_password():
                    yield Member(member_path, name, info.file_size or 0, encrypted=True)
                    continue
                content = None
                kind_found = None
                # a stored member is read by rarfile itself; a compressed one would need unrar
                if info.compress_type == rarfile.RAR_M0 and info.file_redir is None:
                    with archive.open(info) as stream:
                        head = stream.read(SMALL_HEAD)
                        kind_found = sniff(head)
                        if keep_content(name, kind_found):
                            content = head + stream.read((info.file_size or 0) - len(head))
                    yield Member(member_path, name, info.file_size or 0, kind_found, False, content)
                    continue
                yield Member(member_path, name, info.file_size or 0)


def _named_container(name: str) -> bool:
    found = extension(name)
    return found in _ARCHIVE_EXTENSIONS or found in OFFICE_EXTENSIONS


def _check_overlaps(infos: list[zipfile.ZipInfo]) -> None:
    """Entries sharing bytes: the non-recursive zip bomb (one deflate stream read many times)."""
    spans = sorted((info.header_offset, info.compress_size + 30 + len(info.filename)) for info in infos)
    for (start, length), (following, _) in itertools.pairwise(spans):
        if following < start + length:
            raise _Bomb("its entries overlap (a zip bomb)")


def _describe(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return f"cannot be read: {text[:200]}"


def _size(number: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if number >= scale and number % scale == 0:
            return f"{number // scale} {unit}"
    return f"{number} bytes"


class _SevenZipWriter(py7zr.io.Py7zIO):
    """One member's bytes from py7zr: its head always, the whole when it is worth keeping."""

    def __init__(self, sink: _SevenZipSink, name: str) -> None:
        self.sink = sink
        self.name = name
        self.buffer = bytearray()
        self.keep: bool | None = None

    def write(self, data: Any) -> int:
        self.sink.written += len(data)
        if self.sink.written > self.sink.limit:
            raise _Bomb("it holds more than it declares")
        if self.keep is None and len(self.buffer) + len(data) >= SMALL_HEAD:
            self.keep = keep_content(self.name, sniff(bytes(self.buffer) + bytes(data[:SMALL_HEAD])))
        if self.keep or len(self.buffer) < SMALL_HEAD:
            self.buffer += data
        return len(data)

    def head(self) -> bytes:
        return bytes(self.buffer[:SMALL_HEAD])

    def whole(self) -> bytes:
        return bytes(self.buffer)

    def read(self, size: int | None = None) -> bytes:
        return b""

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def flush(self) -> None:
        return None

    def size(self) -> int:
        return len(self.buffer)


class _SevenZipSink(py7zr.io.WriterFactory):
    """A py7zr WriterFactory that keeps members in memory, bounded by what the archive declared."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.written = 0
        self.products: dict[str, _SevenZipWriter] = {}

    def create(self, filename: str) -> _SevenZipWriter:
        self.products[filename] = writer = _SevenZipWriter(self, filename)
        return writer
