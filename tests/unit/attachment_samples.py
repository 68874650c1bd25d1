"""Archives and Office files built at test time, for the attachment tests.

No binary fixtures: zips come from zipfile (encrypted ones by setting the
encryption flag, which is all a reader goes by before it has a password), 7z
from py7zr, RAR 5 from a small writer of stored members below (no free program
writes RAR), OLE2 (Office 97) files from a small compound-file writer, and an
encrypted Office document from msoffcrypto-tool.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

import py7zr


def make_zip(files: list[tuple[str, bytes]], *, encrypt: tuple[str, ...] = ()) -> bytes:
    """A zip of `files` (deflated); members named in `encrypt` carry the encryption flag."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files:
            archive.writestr(name, content)
    data = bytearray(buffer.getvalue())
    for name in encrypt:
        encoded = name.encode()
        # the local header (flags at +6) and the central directory entry (flags at +8)
        for signature, flags_at, length_at, name_at in (
            (b"PK\x03\x04", 6, 26, 30),
            (b"PK\x01\x02", 8, 28, 46),
        ):
            start = 0
            while (start := data.find(signature, start)) >= 0:
                length = struct.unpack_from("<H", data, start + length_at)[0]
                if data[start + name_at : start + name_at + length] == encoded:
                    data[start + flags_at] |= 0x01
                start += 4
    return bytes(data)


def overlapping_zip() -> bytes:
    """Two central directory entries pointing at one local entry: the non-recursive zip bomb."""
    data = make_zip([("a.txt", b"x" * 1000)])
    central = data.find(b"PK\x01\x02")
    end = data.find(b"PK\x05\x06")
    entry = data[central:end]
    second = entry.replace(b"a.txt", b"b.txt")
    records, size = 2, len(entry) * 2
    tail = bytearray(data[end:])
    struct.pack_into("<HHII", tail, 8, records, records, size, central)
    return data[:central] + entry + second + bytes(tail)


def make_7z(files: list[tuple[str, bytes]], password: str | None = None, headers: bool = False) -> bytes:
    buffer = io.BytesIO()
    with py7zr.SevenZipFile(buffer, "w", password=password, header_encryption=headers) as archive:
        for name, content in files:
            archive.writestr(content, name)
    return buffer.getvalue()


# --- RAR 5, stored members only -----------------------------------------------------


def _vint(number: int) -> bytes:
    out = bytearray()
    while True:
        byte = number & 0x7F
        number >>= 7
        out.append(byte | (0x80 if number else 0))
        if not number:
            return bytes(out)


def _block(body: bytes, data: bytes = b"") -> bytes:
    size = _vint(len(body))
    return struct.pack("<I", zlib.crc32(size + body)) + size + body + data


def make_rar(files: list[tuple[str, bytes]], *, encrypt: tuple[str, ...] = ()) -> bytes:
    """A RAR 5 archive of stored members; those in `encrypt` carry a file encryption record."""
    out = bytearray(b"Rar!\x1a\x07\x01\x00")
    out += _block(_vint(1) + _vint(0) + _vint(0))  # main header: no flags
    for name, content in files:
        encoded = name.encode()
        extra = b""
        if name in encrypt:
            record = _vint(1) + _vint(0) + _vint(0) + bytes([15]) + b"\x01" * 16 + b"\x02" * 16
            extra = _vint(len(record)) + record
        flags = 0x0002 | (0x0001 if extra else 0)  # a data area; an extra area
        body = _vint(2) + _vint(flags)
        if extra:
            body += _vint(len(extra))
        body += _vint(len(content))  # data size
        body += _vint(0x0004) + _vint(len(content)) + _vint(0x20)  # file flags (CRC), size, attributes
        body += struct.pack("<I", zlib.crc32(content))
        body += _vint(0) + _vint(0) + _vint(len(encoded)) + encoded + extra  # stored, Windows, name
        out += _block(body, content)
    out += _block(_vint(5) + _vint(0) + _vint(0))  # end of archive
    return bytes(out)


# --- OLE2 compound files (Office 97) ----------------------------------------------------

_FREE, _END, _FAT, _NONE = 0xFFFFFFFF, 0xFFFFFFFE, 0xFFFFFFFD, 0xFFFFFFFF


def make_ole(tree: dict[str, object]) -> bytes:
    """A compound file of storages (dicts) and streams (bytes), every stream in regular sectors."""
    entries: list[dict[str, object]] = [{"name": "Root Entry", "type": 5, "kids": tree}]
    streams: list[tuple[int, bytes]] = []

    def add(children: dict[str, object]) -> int:
        first = _NONE
        for name in sorted(children, key=lambda n: (len(n), n.upper()), reverse=True):
            value = children[name]
            index = len(entries)
            entry: dict[str, object] = {"name": name, "right": first}
            entries.append(entry)
            if isinstance(value, dict):
                entry["type"] = 1
                entry["child"] = add(value)
            else:
                assert isinstance(value, bytes)
                entry["type"] = 2
                streams.append((index, value.ljust(4096, b"\0")))  # >= 4096: no mini stream
            first = index
        return first

    entries[0]["child"] = add(tree)
    directory_sectors = (len(entries) * 128 + 511) // 512
    data_sectors = sum(len(content) // 512 for _, content in streams)
    fat_sectors = 1
    while fat_sectors * 128 < fat_sectors + directory_sectors + data_sectors:
        fat_sectors += 1
    fat = [_FAT] * fat_sectors
    directory_start = len(fat)
    fat += [*range(directory_start + 1, directory_start + directory_sectors), _END]
    starts: dict[int, tuple[int, int]] = {}
    body = bytearray()
    for index, content in streams:
        start = len(fat)
        count = len(content) // 512
        fat += [*range(start + 1, start + count), _END]
        starts[index] = (start, len(content))
        body += content
    fat += [_FREE] * (fat_sectors * 128 - len(fat))
    directory = bytearray()
    for index, entry in enumerate(entries):
        name = str(entry["name"]).encode("utf-16-le") + b"\0\0"
        start, size = starts.get(index, (_END, 0))
        record = name.ljust(64, b"\0") + struct.pack("<HBB", len(name), int(entry["type"]), 1)  # type: ignore[call-overload]
        record += struct.pack("<III", _NONE, int(entry.get("right", _NONE)), int(entry.get("child", _NONE)))  # type: ignore[call-overload]
        record += b"\0" * 16 + b"\0" * 4 + b"\0" * 16 + struct.pack("<IQ", start, size)
        directory += record
    directory = directory.ljust(directory_sectors * 512, b"\0")
    header = bytearray(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 16)
    header += struct.pack("<HHHHH", 0x3E, 3, 0xFFFE, 9, 6) + b"\0" * 6
    header += struct.pack("<IIIIIIIII", 0, fat_sectors, directory_start, 0, 4096, _END, 0, _END, 0)
    header += b"".join(struct.pack("<I", n) for n in range(fat_sectors))
    header = header.ljust(512, b"\xff")
    return bytes(header) + b"".join(struct.pack("<I", n) for n in fat) + bytes(directory) + bytes(body)


def _vba_project() -> dict[str, object]:
    return {
        "PROJECT": b'ID="{00000000-0000-0000-0000-000000000000}"\r\n',
        "VBA": {"_VBA_PROJECT": b"\xcc\x61", "dir": b"\x01"},
    }


def doc_with_macros() -> bytes:
    """A Word 97 document holding a VBA project (what oletools looks for)."""
    return make_ole({"WordDocument": b"\xec\xa5" + b"\0" * 100, "Macros": _vba_project()})


def doc_without_macros() -> bytes:
    return make_ole({"WordDocument": b"\xec\xa5" + b"\0" * 100})


def _ooxml(parts: dict[str, bytes]) -> bytes:
    types = (
        b'<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        b'<Default Extension="xml" ContentType="application/xml"/></Types>'
    )
    return make_zip([("[Content_Types].xml", types), *parts.items()])


def docx() -> bytes:
    return _ooxml({"word/document.xml": b"<w:document/>"})


def docm() -> bytes:
    """A Word 2007 document with macros: word/vbaProject.bin, an OLE2 VBA project."""
    return _ooxml({"word/document.xml": b"<w:document/>", "word/vbaProject.bin": make_ole(_vba_project())})


def encrypted_docx() -> bytes:
    """A password-protected Word document, as Office writes it (an OLE2 EncryptedPackage)."""
    from msoffcrypto.format.ooxml import OOXMLFile

    output = io.BytesIO()
    OOXMLFile(io.BytesIO(docx())).encrypt("secret", output)
    return output.getvalue()
