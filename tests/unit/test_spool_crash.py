"""Kill -9 a process committing messages; every id it acknowledged must survive recovery."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.queue.spool import DirectorySpool
from gateway.queue.testing import PumpedReactor

# The child: 16 "sessions" commit messages as fast as they can, through the real
# reactor, and print each queue id once its Deferred has fired (durable).
CHILD = r"""
import hashlib, sys
from twisted.internet import reactor
from gateway.model import Envelope, Recipient, Session
from gateway.queue.spool import DirectorySpool

def content(queue_id):
    seed = hashlib.sha256(queue_id.encode()).digest()
    size = 300_000 if seed[0] < 16 else 200 + seed[1] * 80  # a few spill to tmp/
    return (seed * (size // 32 + 1))[:size]

spool = DirectorySpool(sys.argv[1], reactor=reactor)
envelope = Envelope("a@example.org", (Recipient("b@example.com"),))
session = Session("192.0.2.1")

def session_loop():
    message = spool.new_message()
    data = content(message.queue_id)
    for start in range(0, len(data), 65536):
        message.write(data[start:start + 65536])
    def done(queue_id):
        sys.stdout.write(queue_id + "\n")
        sys.stdout.flush()
        session_loop()
    message.commit(envelope, session).addCallback(done)

def started(_):
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for _ in range(16):
        session_loop()

spool.recover().addCallback(started)
reactor.run()
"""


def content(queue_id: str) -> bytes:
    seed = hashlib.sha256(queue_id.encode()).digest()
    size = 300_000 if seed[0] < 16 else 200 + seed[1] * 80
    return (seed * (size // 32 + 1))[:size]


@pytest.mark.parametrize("round", range(3))
def test_acknowledged_messages_survive_kill_9(tmp_path: Path, round: int) -> None:
    spool_dir = str(tmp_path / "spool")
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, spool_dir], stdout=subprocess.PIPE, env=env, cwd=os.getcwd()
    )
    assert child.stdout is not None
    assert child.stdout.readline() == b"ready\n"
    time.sleep(random.uniform(0.3, 1.5))
    child.send_signal(signal.SIGKILL)
    output = child.stdout.read()
    child.wait()
    acknowledged = [line.decode() for line in output.split(b"\n")[:-1]]  # only whole lines
    assert len(acknowledged) > 50, "the child should have committed something"

    reactor = PumpedReactor()
    spool = DirectorySpool(spool_dir, reactor=reactor)
    reactor.wait(spool.recover())
    try:
        incoming = set(spool.list("incoming"))
        assert spool.list("corrupt") == []
        assert set(acknowledged) <= incoming
        for queue_id in acknowledged:
            assert spool.load(queue_id).size == len(content(queue_id))
            assert spool.message_bytes(queue_id) == content(queue_id)
        for queue_id in incoming:  # committed but not yet printed: complete too
            assert spool.message_bytes(queue_id) == content(queue_id)
        assert os.listdir(os.path.join(spool_dir, "tmp")) == []
        messages = {n[:-4] for _, _, names in os.walk(os.path.join(spool_dir, "message")) for n in names}
        assert messages == incoming
    finally:
        reactor.wait(spool.stop())
