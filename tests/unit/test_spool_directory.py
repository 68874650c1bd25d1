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

from gateway.queue import _committer
from gateway.queue._ids import hash_dirs
from gateway.queue.spool import DirectorySpool, EnvelopeFormatError, SpoolError
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


def test_layout_modes_and_a_readable_envelope(
    tmp_path: Path, reactor: PumpedReactor, make_spool: Factory
) -> None:
    spool = make_spool()
    queue_id = store(reactor, spool)
    x, y = hash_dirs(queue_id, 2)
    assert queue_id[-1] == x and queue_id[-2] == y
    root = tmp_path / "spool"
    assert files(root) == [f"incoming/{x}/{y}/{queue_id}.json", "lock", f"message/{x}/{y}/{queue_id}.eml"]
    assert spool.message_path(queue_id) == str(root / "message" / x / y / f"{queue_id}.eml")
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "incoming" / x / y).stat().st_mode) == 0o700
    assert stat.S_IMODE(Path(spool.message_path(queue_id)).stat().st_mode) == 0o600
    document = json.loads((root / "incoming" / x / y / f"{queue_id}.json").read_text())
    assert document["format"] == 1 and document["version"] == 1 and document["queue_id"] == queue_id
    assert document["envelope"]["mail_from"] == "alice@example.org"
    assert document["envelope"]["rcpt_to"][0] == {
        "address": "bob@example.com",
        "notify": ["DELAY", "FAILURE"],
        "orcpt": "rfc822;bob@example.com",
    }
    assert document["recipients"][1]["status"] == "pending"
    assert document["session"]["helo"] == "client.example.org"
    assert "state" not in document  # the directory is the state


@pytest.mark.parametrize("levels", [0, 1, 3])
def test_hash_levels(tmp_path: Path, reactor: PumpedReactor, make_spool: Factory, levels: int) -> None:
    spool = make_spool(hash_levels=levels)
    queue_id = store(reactor, spool)
    hashed = "/".join(queue_id[-1 - n] for n in range(levels))
    expected = f"incoming/{hashed}/{queue_id}.json".replace("//", "/")
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
    good, garbled, orphan, headless = (store(reactor, spool, b"%d\r\n" % n) for n in range(4))
    spilled = spool.new_message()
    spilled.write(b"z" * 10_000)  # half-received when the process "dies"
    reactor.wait(spool.stop())
    root = tmp_path / "spool"
    Path(spool.layout.envelope("incoming", garbled)).write_bytes(b'{"format": 1, "queue_')
    os.unlink(spool.layout.envelope("incoming", orphan))  # a removal cut short
    os.unlink(spool.message_path(headless))  # an envelope without its message
    Path(spool.layout.temp_envelope(good, 2)).write_bytes(b"{}")

    spool = make_spool()
    assert spool.recovery is not None
    assert attrs.asdict(spool.recovery) == {"messages": 1, "requeued": 0, "removed": 3, "corrupt": 2}
    assert spool.list("incoming") == [good]
    assert spool.list("corrupt") == sorted([garbled, headless])
    assert files(root / "tmp") == []
    assert not os.path.exists(spool.layout.message(orphan))
    assert os.path.exists(spool.layout.corrupt_message(garbled))  # never deleted
    assert spool.message_path(garbled) == spool.layout.corrupt_message(garbled)
    assert spool.find(garbled) == "corrupt"
    with pytest.raises(EnvelopeFormatError):
        spool.load(garbled)
    assert spool.load(headless).state == "corrupt"
    reactor.wait(spool.remove(garbled))  # the operator deletes it
    assert spool.list("corrupt") == [headless]
    assert not os.path.exists(spool.layout.corrupt_message(garbled))


def test_recover_keeps_the_newest_copy_after_a_move_was_cut_short(
    reactor: PumpedReactor, make_spool: Factory
) -> None:
    spool = make_spool()
    queue_id = store(reactor, spool)
    old = Path(spool.layout.envelope("incoming", queue_id)).read_bytes()
    message = spool.load(queue_id)
    reactor.wait(spool.update(attrs.evolve(message, state="deferred", attempts=1)))
    # the crash: the new copy is in deferred/, the old one was never unlinked
    Path(spool.layout.envelope("incoming", queue_id)).write_bytes(old)
    spool = make_spool()
    assert spool.list("incoming") == []
    assert spool.list("deferred") == [queue_id]
    assert spool.load(queue_id).attempts == 1


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
        ("fsync", lambda n: n == 2),  # the message directory's fsync
        ("fsync", lambda n: n == 3),  # the envelope file's fsync
        ("fsync", lambda n: n == 4),  # the incoming directory's fsync: envelope already renamed
        ("write", lambda n: True),
        ("rename", lambda n: n == 2),  # the envelope's rename
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
    assert [f for f in files(tmp_path / "spool") if f.endswith(".json")] == [
        os.path.relpath(spool.layout.envelope("incoming", queue_id), tmp_path / "spool")
    ]


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
    assert dir_syncs <= 4 * batches  # message/X/Y and incoming/X/Y, per batch (and a second's turn)


def test_without_fsync_nothing_is_synced(
    reactor: PumpedReactor, make_spool: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = make_spool(fsync=False)
    calls: list[int] = []
    monkeypatch.setattr(_committer.os, "fsync", _failing(calls, lambda n: False, os.fsync))
    queue_id = store(reactor, spool)
    assert calls == []
    assert spool.message_bytes(queue_id) == b"Subject: x\r\n\r\nbody\r\n"
