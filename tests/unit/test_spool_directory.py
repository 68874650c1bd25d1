"""DirectorySpool on disk: layout, format, recovery, failures, group commit."""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from gateway.model import Recipient
from gateway.queue import _committer, open_message
from gateway.queue._format import dumps
from gateway.queue._ids import hash_dirs
from gateway.queue.spool import RESERVED, DirectorySpool, EnvelopeFormatError, SpoolError
from gateway.queue.testing import PumpedReactor
from tests.unit.test_spool_contract import ENVELOPE, SESSION

Factory = Callable[..., DirectorySpool]


@pytest.fixture
def reactor() -> PumpedReactor:
    return PumpedReactor()


@pytest.fixture(params=["recover", "recover_now"])
def make_spool(tmp_path: Path, reactor: PumpedReactor, request: pytest.FixtureRequest) -> Iterator[Factory]:
    """Start a DirectorySpool on tmp_path/spool (stopping the previous one), recovered.

    Recovered in the writer thread (`recover`) or at once (`recover_now`, the gateway's
    start): every test runs with both.
    """
    spools: list[DirectorySpool] = []

    def make(**options: Any) -> DirectorySpool:
        if spools:
            reactor.wait(spools[-1].stop())
        options.setdefault("memory_limit", 4096)
        spool = DirectorySpool(str(tmp_path / "spool"), reactor=reactor, **options)
        spools.append(spool)
        if request.param == "recover":
            reactor.wait(spool.recover())
        else:
            spool.recover_now()
        return spool

    yield make
    if spools:
        reactor.wait(spools[-1].stop())


def store(
    reactor: PumpedReactor, spool: DirectorySpool, content: bytes = b"Subject: x\r\n\r\nbody\r\n"
) -> str:
    message = spool.new_message()
    message.write(content)
    queue_id: str = reactor.wait(message.commit(ENVELOPE, SESSION))
    return queue_id


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def header_document(path: str) -> dict[str, Any]:
    """The first envelope, in the header of a message file."""
    with open(path, "rb") as handle:
        line = handle.readline()
        assert line.startswith(b"MAILGATE-QUEUE 1 ") and len(line) == 28
        document: dict[str, Any] = json.loads(handle.read(int(line[17:27]) - 28))
    return document


def test_layout_modes_and_a_readable_envelope(
    tmp_path: Path, reactor: PumpedReactor, make_spool: Factory
) -> None:
    spool = make_spool()
    queue_id = store(reactor, spool)
    x, y = hash_dirs(queue_id, 2)
    assert queue_id[-1] == x and queue_id[-2] == y
    root = tmp_path / "spool"
    # a commit is one file: the first envelope is the message file's header
    assert files(root) == ["lock", f"message/{x}/{y}/{queue_id}.eml"]
    assert spool.message_path(queue_id) == str(root / "message" / x / y / f"{queue_id}.eml")
    assert spool.message_bytes(queue_id) == b"Subject: x\r\n\r\nbody\r\n"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "message" / x / y).stat().st_mode) == 0o700
    assert stat.S_IMODE(Path(spool.message_path(queue_id)).stat().st_mode) == 0o600
    document = header_document(spool.message_path(queue_id))
    assert document["format"] == 1 and document["version"] == 1 and document["queue_id"] == queue_id
    assert document["state"] == "incoming"  # in no state directory: the header says
    assert document["envelope"]["mail_from"] == "alice@example.org"
    assert document["envelope"]["rcpt_to"][0] == {
        "address": "bob@example.com",
        "notify": ["DELAY", "FAILURE"],
        "orcpt": "rfc822;bob@example.com",
    }
    assert document["recipients"][1]["status"] == "pending"
    assert document["session"]["helo"] == "client.example.org"
    # a later version is a file of its own, and its directory is its state
    reactor.wait(spool.update(attrs.evolve(spool.load(queue_id), state="deferred", attempts=1)))
    assert files(root) == [f"deferred/{x}/{y}/{queue_id}.json", "lock", f"message/{x}/{y}/{queue_id}.eml"]
    document = json.loads((root / "deferred" / x / y / f"{queue_id}.json").read_text())
    assert document["version"] == 2 and "state" not in document
    assert stat.S_IMODE((root / "deferred" / x / y).stat().st_mode) == 0o700


@pytest.mark.parametrize("recipients", [2, 400])
def test_a_spilled_message_gets_its_header_in_the_room_kept_or_a_copy(
    reactor: PumpedReactor, make_spool: Factory, recipients: int
) -> None:
    spool = make_spool(memory_limit=1000)
    envelope = attrs.evolve(
        ENVELOPE, rcpt_to=tuple(Recipient(f"recipient-number-{n}@example.com") for n in range(recipients))
    )
    content = b"Subject: big\r\n\r\n" + b"b" * 50_000 + b"\r\n"
    message = spool.new_message()
    for start in range(0, len(content), 4096):
        message.write(content[start : start + 4096])
    queue_id = reactor.wait(message.commit(envelope, SESSION))
    with open(spool.message_path(queue_id), "rb") as handle:
        offset = int(handle.readline()[17:27])
    # two recipients fit in the 8 KiB kept at the start; 400 do not: the message is copied
    assert (offset == RESERVED) is (recipients == 2)
    for each in (spool, make_spool()):
        assert each.message_bytes(queue_id) == content
        assert each.load(queue_id).envelope == envelope
        assert each.load(queue_id).size == len(content)


@pytest.mark.parametrize("levels", [0, 1, 3])
def test_hash_levels(tmp_path: Path, reactor: PumpedReactor, make_spool: Factory, levels: int) -> None:
    spool = make_spool(hash_levels=levels)
    queue_id = store(reactor, spool)
    hashed = "/".join(queue_id[-1 - n] for n in range(levels))
    expected = f"message/{hashed}/{queue_id}.eml".replace("//", "/")
    assert expected in files(tmp_path / "spool")
    assert spool.list("incoming") == [queue_id]
    with pytest.raises(ValueError):
        DirectorySpool(str(tmp_path / "other"), reactor=reactor, hash_levels=5)


def test_a_cold_spool_reads_what_the_previous_process_wrote(
    reactor: PumpedReactor, make_spool: Factory
) -> None:
    spool = make_spool()
    queue_id = store(reactor, spool)
    message = spool.load(queue_id)
    updated = attrs.evolve(message, attempts=2, state="deferred", next_attempt=99.5)
    reactor.wait(spool.update(updated))
    again = make_spool()
    assert again.load(queue_id) == updated
    assert again.message_bytes(queue_id) == b"Subject: x\r\n\r\nbody\r\n"
    reactor.wait(again.update(attrs.evolve(updated, state="incoming")))  # version 3, back to incoming
    third = make_spool()
    assert third.list("deferred") == [] and third.list("incoming") == [queue_id]


def test_start_creates_a_missing_spool(tmp_path: Path, reactor: PumpedReactor) -> None:
    path = tmp_path / "state" / "spool"
    spool = DirectorySpool(str(path), reactor=reactor)
    assert reactor.wait(spool.recover()) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert {p.name for p in path.iterdir()} >= {"tmp", "message", "incoming", "active", "deferred", "hold"}
    reactor.wait(spool.stop())


def test_a_second_process_cannot_use_the_spool(
    tmp_path: Path, reactor: PumpedReactor, make_spool: Factory
) -> None:
    make_spool()
    other = DirectorySpool(str(tmp_path / "spool"), reactor=reactor)
    with pytest.raises(SpoolError, match="in use by another process"):
        reactor.wait(other.recover())
    reactor.wait(other.stop())


def test_a_large_message_spills_to_tmp_and_abort_removes_it(tmp_path: Path, make_spool: Factory) -> None:
    spool = make_spool(memory_limit=1000)
    message = spool.new_message()
    message.write(b"a" * 600)
    assert files(tmp_path / "spool" / "tmp") == []
    message.write(b"b" * 600)  # over the limit: now in a file
    assert files(tmp_path / "spool" / "tmp") == [f"{message.queue_id}.eml"]
    message.abort()
    assert files(tmp_path / "spool" / "tmp") == []


def test_recover_cleans_up_and_sets_aside_what_it_cannot_read(
    tmp_path: Path, reactor: PumpedReactor, make_spool: Factory
) -> None:
    spool = make_spool()
    good, garbled, headless, removed, damaged = (store(reactor, spool, b"%d\r\n" % n) for n in range(5))
    for queue_id in (removed, damaged):  # version 2, in deferred/
        reactor.wait(spool.update(attrs.evolve(spool.load(queue_id), state="deferred", attempts=1)))
    spilled = spool.new_message()
    spilled.write(b"z" * 10_000)  # half-received when the process "dies"
    reactor.wait(spool.stop())
    root = tmp_path / "spool"
    with open(spool.message_path(garbled), "r+b") as handle:
        handle.seek(40)
        handle.write(b"\xff\xfe garbage")  # the header's envelope cannot be read
    Path(spool.message_path(headless)).write_bytes(b"no header, no envelope file\r\n")  # never committed
    os.unlink(spool.message_path(removed))  # a removal cut short: the message file goes first
    Path(spool.layout.envelope("deferred", damaged)).write_bytes(b'{"format": 1, "queue_')
    Path(spool.layout.temp_envelope(good, 2)).write_bytes(b"{}")

    spool = make_spool()
    assert spool.recovery is not None
    assert attrs.asdict(spool.recovery) == {"messages": 1, "requeued": 0, "removed": 4, "corrupt": 2}
    assert spool.list("incoming") == [good]
    assert spool.list("deferred") == []
    assert spool.list("corrupt") == sorted([garbled, damaged])
    assert files(root / "tmp") == []
    for gone in (headless, removed):
        assert not os.path.exists(spool.layout.message(gone))
        assert not os.path.exists(spool.layout.envelope("deferred", gone))
    for kept in (garbled, damaged):  # never deleted
        assert os.path.exists(spool.layout.corrupt_message(kept))
        assert spool.message_path(kept) == spool.layout.corrupt_message(kept)
        assert spool.find(kept) == "corrupt"
    with pytest.raises(EnvelopeFormatError):
        spool.load(damaged)
    assert spool.message_bytes(damaged) == b"4\r\n"
    reactor.wait(spool.remove(damaged))  # the operator deletes it
    assert spool.list("corrupt") == [garbled]
    assert not os.path.exists(spool.layout.corrupt_message(damaged))


def test_recover_keeps_the_newest_copy_after_a_move_was_cut_short(
    reactor: PumpedReactor, make_spool: Factory
) -> None:
    spool = make_spool()
    queue_id = store(reactor, spool)
    message = spool.load(queue_id)
    reactor.wait(spool.update(attrs.evolve(message, state="deferred", attempts=1)))  # version 2
    reactor.wait(spool.update(attrs.evolve(message, state="incoming", attempts=2)))  # version 3
    old = Path(spool.layout.envelope("incoming", queue_id)).read_bytes()
    reactor.wait(spool.update(attrs.evolve(message, state="deferred", attempts=3)))  # version 4
    # the crash: the new copy is in deferred/, the old one was never unlinked
    Path(spool.layout.envelope("incoming", queue_id)).write_bytes(old)
    spool = make_spool()
    assert spool.list("incoming") == []
    assert spool.list("deferred") == [queue_id]
    assert spool.load(queue_id).attempts == 3


def test_a_removal_makes_the_message_file_go_first(
    tmp_path: Path, reactor: PumpedReactor, make_spool: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = make_spool()
    fresh, deferred = store(reactor, spool), store(reactor, spool)
    reactor.wait(spool.update(attrs.evolve(spool.load(deferred), state="deferred", attempts=1)))
    calls: list[str] = []
    for name in ("unlink", "fsync"):
        real = getattr(os, name)
        monkeypatch.setattr(_committer.os, name, lambda *a, _n=name, _r=real: calls.append(_n) or _r(*a))
    reactor.wait(spool.remove(fresh))
    assert calls == ["unlink"]  # one file, nothing to order: no fsync
    calls.clear()
    reactor.wait(spool.remove(deferred))
    # the message file, its directory synced, then the envelope file of version 2
    assert calls == ["unlink", "fsync", "unlink"]
    assert files(tmp_path / "spool") == ["lock"]


def _failing(
    calls: list[int], fail_on: Callable[[int], bool], real: Callable[..., Any]
) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        calls.append(1)
        if fail_on(len(calls)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args)

    return call


@pytest.mark.parametrize(
    ("function", "fail_on"),
    [
        ("fsync", lambda n: True),  # the message file's fsync
        ("fsync", lambda n: n == 2),  # the message directory's fsync: the file already renamed
        ("write", lambda n: True),
        ("rename", lambda n: True),  # the message file's rename
    ],
)
def test_a_full_disk_fails_the_commit_and_leaves_nothing(
    tmp_path: Path,
    reactor: PumpedReactor,
    make_spool: Factory,
    monkeypatch: pytest.MonkeyPatch,
    function: str,
    fail_on: Callable[[int], bool],
) -> None:
    spool = make_spool(writer_threads=1)
    kept = store(reactor, spool)
    calls: list[int] = []
    monkeypatch.setattr(_committer.os, function, _failing(calls, fail_on, getattr(os, function)))
    message = spool.new_message()
    message.write(b"Subject: lost\r\n\r\n")
    woken: list[str] = []
    spool.subscribe(woken.append)
    with pytest.raises(SpoolError) as caught:
        reactor.wait(message.commit(ENVELOPE, SESSION))
    assert "No space left on device" in str(caught.value)
    assert str(tmp_path / "spool") in str(caught.value)
    assert caught.value.errno == errno.ENOSPC
    assert woken == []
    assert [f for f in files(tmp_path / "spool") if message.queue_id in f] == []
    assert spool.list("incoming") == [kept]
    with pytest.raises(KeyError):
        spool.load(message.queue_id)
    monkeypatch.undo()
    assert spool.load(store(reactor, spool)).state == "incoming"  # the writer goes on


def test_a_full_disk_while_spilling_fails_the_write(
    reactor: PumpedReactor, make_spool: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = make_spool(memory_limit=100)
    message = spool.new_message()
    message.write(b"x" * 90)
    monkeypatch.setattr("gateway.queue.spool.os.open", _failing([], lambda n: True, os.open))
    with pytest.raises(SpoolError, match="No space left on device"):
        message.write(b"x" * 90)
    message.abort()


def test_a_failed_update_keeps_the_previous_state(
    tmp_path: Path, reactor: PumpedReactor, make_spool: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = make_spool()
    queue_id = store(reactor, spool)
    message = spool.load(queue_id)
    monkeypatch.setattr(_committer.os, "fsync", _failing([], lambda n: n == 2, os.fsync))  # new directory
    with pytest.raises(SpoolError, match="No space left on device"):
        reactor.wait(spool.update(attrs.evolve(message, state="deferred", attempts=1)))
    monkeypatch.undo()
    assert spool.load(queue_id) == message
    assert make_spool().load(queue_id) == message
    assert [f for f in files(tmp_path / "spool") if f.endswith(".json")] == []  # the header is in force


def test_commits_waiting_for_a_writer_share_directory_fsyncs(
    reactor: PumpedReactor, make_spool: Factory
) -> None:
    spool = make_spool(writer_threads=1)
    committer = spool.committer
    before = (committer.batches, committer.operations, committer.dir_syncs)
    pending = []
    for _ in range(100):
        message = spool.new_message()
        message.write(b"x" * 10_000)
        pending.append(message.commit(ENVELOPE, SESSION))
    ids = [reactor.wait(d) for d in pending]
    batches = committer.batches - before[0]
    operations = committer.operations - before[1]
    dir_syncs = committer.dir_syncs - before[2]
    assert operations == 100 and len(set(ids)) == 100
    assert batches < 20  # one writer: the commits pile up and go in batches
    assert dir_syncs <= 2 * batches  # message/X/Y per batch (and a second's turn)


def test_without_fsync_nothing_is_synced(
    reactor: PumpedReactor, make_spool: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = make_spool(fsync=False)
    calls: list[int] = []
    monkeypatch.setattr(_committer.os, "fsync", _failing(calls, lambda n: False, os.fsync))
    queue_id = store(reactor, spool)
    assert calls == []
    assert spool.message_bytes(queue_id) == b"Subject: x\r\n\r\nbody\r\n"


def test_a_spool_written_before_the_header_existed_is_read_as_it_is(
    tmp_path: Path, reactor: PumpedReactor, make_spool: Factory
) -> None:
    """Message files without a header, their first envelope in incoming/ (the earlier format)."""
    spool = make_spool()
    queue_id = store(reactor, spool)
    message = spool.load(queue_id)
    reactor.wait(spool.stop())
    # rewrite it the way the earlier version stored it: raw message, envelope file of version 1
    Path(spool.message_path(queue_id)).write_bytes(b"Subject: old\r\n\r\nbody\r\n")
    os.makedirs(os.path.dirname(spool.layout.envelope("incoming", queue_id)), exist_ok=True)
    Path(spool.layout.envelope("incoming", queue_id)).write_bytes(dumps(message, 1, None))
    never = "1K0AAAAAAAAAA0001"  # an unfinished commit of the earlier version: a message file alone
    os.makedirs(os.path.dirname(spool.layout.message(never)), exist_ok=True)
    Path(spool.layout.message(never)).write_bytes(b"Subject: never acknowledged\r\n\r\n")

    spool = make_spool()
    assert spool.recovery is not None and spool.recovery.removed == 1
    assert not os.path.exists(spool.layout.message(never))
    assert spool.list("incoming") == [queue_id]
    assert spool.load(queue_id) == message
    assert spool.message_bytes(queue_id) == b"Subject: old\r\n\r\nbody\r\n"
    with open_message(spool.message_path(queue_id)) as handle:
        assert handle.read() == b"Subject: old\r\n\r\nbody\r\n"
    reactor.wait(spool.update(attrs.evolve(message, state="deferred", attempts=1)))
    reactor.wait(spool.remove(queue_id))
    assert files(tmp_path / "spool") == ["lock"]
