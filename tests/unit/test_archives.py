"""Inside archives without unpacking them: members, nesting, encryption, bombs, broken archives."""

from __future__ import annotations

import zipfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.filters._archives import ArchiveLimits, Problem, list_archive
from gateway.filters._filetypes import disguised_name, double_extension, extensions, sniff
from tests.unit.attachment_samples import make_7z, make_rar, make_zip, overlapping_zip

PROGRAM = b"MZ\x90\x00" + b"\0" * 60


def paths(listing: object) -> list[tuple[str, str | None]]:
    return [(member.path, member.kind) for member in listing.members]  # type: ignore[attr-defined]


def troubles(listing: object) -> list[tuple[Problem, str]]:
    return [(trouble.problem, trouble.path) for trouble in listing.troubles]  # type: ignore[attr-defined]


def test_zip_members_are_listed_with_the_type_their_bytes_say() -> None:
    listing = list_archive("a.zip", "zip", make_zip([("photo.jpg", PROGRAM), ("notes.txt", b"hello")]))
    assert paths(listing) == [("a.zip/photo.jpg", "pe"), ("a.zip/notes.txt", None)]
    assert listing.troubles == ()


def test_nested_archives_are_walked_and_members_named_by_their_path() -> None:
    inner = make_zip([("evil.exe", PROGRAM)])
    middle = make_7z([("inner.zip", inner)])
    listing = list_archive("outer.zip", "zip", make_zip([("middle.7z", middle)]))
    assert ("outer.zip/middle.7z/inner.zip/evil.exe", "pe") in paths(listing)


def test_nesting_deeper_than_the_limit_is_a_bomb_and_is_not_opened() -> None:
    archive = make_zip([("evil.exe", PROGRAM)])
    for level in range(4):
        archive = make_zip([(f"level{level}.zip", archive)])
    listing = list_archive("top.zip", "zip", archive, ArchiveLimits(max_depth=3))
    assert troubles(listing) == [(Problem.BOMB, "top.zip/level3.zip/level2.zip/level1.zip")]
    assert not any(path.endswith("evil.exe") for path, _ in paths(listing))


def test_a_highly_compressed_member_is_a_bomb_refused_before_it_is_decompressed() -> None:
    listing = list_archive("bomb.zip", "zip", make_zip([("zeros.bin", b"\0" * 3_000_000)]))
    assert troubles(listing) == [(Problem.BOMB, "bomb.zip")]
    assert "to 1" in listing.troubles[0].detail
    assert listing.members == ()


def test_small_members_are_not_judged_by_their_ratio() -> None:
    listing = list_archive("a.zip", "zip", make_zip([("blank.txt", b" " * 100_000)]))
    assert listing.troubles == ()


def test_the_total_uncompressed_size_and_the_file_count_are_bounded_over_every_level() -> None:
    inner = make_zip([(f"f{n}.txt", bytes([n]) * 600) for n in range(6)])
    archive = make_zip([("a.zip", inner), ("b.zip", inner)])
    assert troubles(list_archive("x.zip", "zip", archive, ArchiveLimits(max_files=10))) == [
        (Problem.BOMB, "x.zip/b.zip")
    ]
    limited = list_archive("x.zip", "zip", archive, ArchiveLimits(max_total_size=5000))
    assert troubles(limited) == [(Problem.BOMB, "x.zip/b.zip")]
    assert "more than 5000 bytes uncompressed" in limited.troubles[0].detail


def test_overlapping_entries_are_a_bomb() -> None:
    listing = list_archive("o.zip", "zip", overlapping_zip())
    assert troubles(listing) == [(Problem.BOMB, "o.zip")]
    assert "overlap" in listing.troubles[0].detail


def test_encrypted_zip_members_are_reported_and_not_read() -> None:
    listing = list_archive("e.zip", "zip", make_zip([("a.txt", b"x"), ("b.doc", b"y")], encrypt=("b.doc",)))
    assert troubles(listing) == [(Problem.ENCRYPTED, "e.zip/b.doc")]
    assert [m.encrypted for m in listing.members] == [False, True]


def test_encrypted_7z_members_and_encrypted_7z_headers() -> None:
    members = list_archive("e.7z", "7z", make_7z([("a.exe", PROGRAM)], password="secret"))
    assert troubles(members) == [(Problem.ENCRYPTED, "e.7z/a.exe")]
    hidden = list_archive("h.7z", "7z", make_7z([("a.exe", PROGRAM)], password="secret", headers=True))
    assert troubles(hidden) == [(Problem.ENCRYPTED, "h.7z")]
    assert hidden.members == ()


def test_rar_members_are_listed_and_stored_ones_read() -> None:
    listing = list_archive(
        "r.rar", "rar", make_rar([("report.pdf", PROGRAM), ("x.txt", b"x")], encrypt=("x.txt",))
    )
    assert paths(listing) == [("r.rar/report.pdf", "pe"), ("r.rar/x.txt", None)]
    assert troubles(listing) == [(Problem.ENCRYPTED, "r.rar/x.txt")]


def test_a_zip_inside_a_rar_is_walked() -> None:
    archive = make_rar([("in.zip", make_zip([("run.scr", PROGRAM)]))])
    assert ("r.rar/in.zip/run.scr", "pe") in paths(list_archive("r.rar", "rar", archive))


@pytest.mark.parametrize(
    "payload",
    [
        b"PK\x03\x04 not a zip at all",
        make_zip([("a.txt", b"hello" * 100)])[:-30],  # cut short
        b"7z\xbc\xaf\x27\x1c\x00\x04" + b"\xff" * 40,
        b"Rar!\x1a\x07\x01\x00" + b"\x00" * 20,
    ],
)
def test_a_broken_archive_is_unreadable_not_an_exception(payload: bytes) -> None:
    kind = {b"PK": "zip", b"7z": "7z", b"Ra": "rar"}[payload[:2]]
    listing = list_archive("broken", kind, payload)
    assert [t.problem for t in listing.troubles] == [Problem.UNREADABLE]


def test_a_member_whose_crc_is_wrong_is_unreadable() -> None:
    data = bytearray(make_zip([("a.txt", b"hello world")]))
    with zipfile.ZipFile(__import__("io").BytesIO(bytes(data))) as archive:
        offset = archive.infolist()[0].header_offset + 14  # the local CRC
    data[offset] ^= 0xFF
    central = data.find(b"PK\x01\x02") + 16
    data[central] ^= 0xFF
    listing = list_archive("c.zip", "zip", bytes(data))
    assert [t.problem for t in listing.troubles] == [Problem.UNREADABLE]


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400), st.sampled_from(["zip", "7z", "rar"]))
def test_random_bytes_never_escape_as_an_exception(noise: bytes, kind: str) -> None:
    prefix = {"zip": b"PK\x03\x04", "7z": b"7z\xbc\xaf\x27\x1c", "rar": b"Rar!\x1a\x07\x01\x00"}[kind]
    listing = list_archive("noise", kind, prefix + noise)
    assert all(t.problem is Problem.UNREADABLE for t in listing.troubles)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_a_corrupted_real_zip_never_escapes_as_an_exception(data: st.DataObject) -> None:
    archive = bytearray(make_zip([("a.exe", PROGRAM), ("in.zip", make_zip([("b.txt", b"hi" * 50)]))]))
    for _ in range(data.draw(st.integers(1, 8))):
        archive[data.draw(st.integers(0, len(archive) - 1))] = data.draw(st.integers(0, 255))
    list_archive("c.zip", "zip", bytes(archive))


def test_file_types_from_magic_bytes() -> None:
    assert sniff(PROGRAM) == "pe"
    assert sniff(b"\x7fELF\x02") == "elf"
    assert sniff(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1") == "ole"
    assert sniff(b"#!/bin/sh\n") == "script"
    assert sniff(b"\0" * 0x8001 + b"CD001") == "iso"
    assert sniff(b"%PDF-1.7") == "pdf"
    assert sniff(b"hello") is None


def test_names_are_read_as_windows_opens_them() -> None:
    assert extensions("Invoice.PDF.exe. . ") == ("pdf", "exe")
    assert double_extension("invoice.pdf.exe")
    assert double_extension("invoice.pdf          .exe")
    assert not double_extension("archive.tar.gz")
    assert not double_extension("report.2024.pdf")
    assert disguised_name("invoice\u202egpj.exe")
    assert not disguised_name("invoice.pdf")
