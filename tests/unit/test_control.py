"""The control socket protocol and mailgatectl's side of it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from gateway import cli
from gateway.admin.control import ControlFactory
from gateway.config import DeliveryConfig
from gateway.delivery.manager import QueueManager
from gateway.delivery.router import Router
from gateway.model import Envelope, Recipient, RecipientResult, Session
from gateway.queue.memory import MemorySpool


class DeferringTransport:
    name = "test"

    def deliver(self, delivery):  # type: ignore[no-untyped-def]
        return succeed(
            [RecipientResult(r, 451, "4.4.1", "connection refused", "none") for r in delivery.recipients]
        )


class ControlTests(TestCase):
    def setUp(self) -> None:
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        self.spool = MemorySpool(directory=directory)
        self.manager = QueueManager(
            self.spool,
            Router(()),
            lambda route: DeferringTransport(),
            lambda m, f: succeed(None),
            DeliveryConfig(),
            Clock(),
        )
        self.spool.subscribe(self.manager.wake)
        incoming = self.spool.new_message()
        incoming.write(b"Subject: hello\r\nFrom: a@b.test\r\n\r\nbody\r\n")
        ids: list[str] = []
        incoming.commit(Envelope("a@b.test", (Recipient("c@d.test"),)), Session("192.0.2.1")).addCallback(
            ids.append
        )
        self.queue_id = ids[0]
        self.transport = StringTransport()
        self.protocol = ControlFactory(self.manager, self.spool).buildProtocol(None)
        self.protocol.makeConnection(self.transport)

    def ask(self, **request: object) -> dict[str, object]:
        self.transport.clear()
        self.protocol.dataReceived(json.dumps(request).encode() + b"\n")
        return json.loads(self.transport.value())  # type: ignore[no-any-return]

    def test_list_shows_deferred_message_with_its_reply(self) -> None:
        answer = self.ask(command="queue.list")
        [row] = answer["result"]  # type: ignore[misc]
        self.assertEqual(row["state"], "deferred")
        self.assertEqual(row["recipients"][0]["last_reply"], "connection refused")

    def test_show_includes_headers(self) -> None:
        answer = self.ask(command="queue.show", id=self.queue_id)
        self.assertIn("Subject: hello", answer["result"]["headers"])  # type: ignore[index]

    def test_hold_release_delete(self) -> None:
        self.assertTrue(self.ask(command="queue.hold", id=self.queue_id)["ok"])
        self.assertEqual(self.spool.load(self.queue_id).state, "hold")
        self.assertTrue(self.ask(command="queue.release", id=self.queue_id)["ok"])
        self.assertNotEqual(self.spool.load(self.queue_id).state, "hold")
        self.assertTrue(self.ask(command="queue.delete", id=self.queue_id)["ok"])
        self.assertNotIn(self.queue_id, self.spool.messages)

    def test_unknown_id_and_bad_requests_are_clear_errors(self) -> None:
        answer = self.ask(command="queue.hold", id="00000000000000000")
        self.assertFalse(answer["ok"])
        self.assertIn("no such message", answer["error"])  # type: ignore[operator]
        self.transport.clear()
        self.protocol.dataReceived(b"not json\n")
        self.assertIn(b"malformed", self.transport.value())

    def test_release_of_a_message_not_held_says_so(self) -> None:
        answer = self.ask(command="queue.release", id=self.queue_id)
        self.assertFalse(answer["ok"])
        self.assertIn("not on hold", answer["error"])  # type: ignore[operator]


def test_cli_says_the_gateway_is_not_running(tmp_path: os.PathLike[str], capsys: object) -> None:
    config = os.path.join(tmp_path, "m.toml")
    with open(config, "w") as handle:
        handle.write(f'[gateway]\nstate_dir = "{tmp_path}"\n')
    assert cli.main(["--config", config, "queue", "list"]) == 1
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert "the gateway is not running" in err
    assert err.count("\n") == 1


def test_cli_config_check_prints_errors_with_line(tmp_path: os.PathLike[str], capsys: object) -> None:
    config = os.path.join(tmp_path, "m.toml")
    with open(config, "w") as handle:
        handle.write("[smtp]\nmax_recipients = 0\n")
    assert cli.main(["--config", config, "config", "check"]) == 2
    assert "line 2: smtp.max_recipients: must be at least 1" in capsys.readouterr().err  # type: ignore[attr-defined]


def test_cli_talks_json_lines_over_the_socket(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "c.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)

    def answer() -> None:
        conn, _ = server.accept()
        request = json.loads(conn.makefile().readline())
        conn.sendall(json.dumps({"ok": True, "result": request}).encode() + b"\n")
        conn.close()

    thread = threading.Thread(target=answer)
    thread.start()
    assert cli.call(path, {"command": "status"}) == {"command": "status"}
    thread.join()
    server.close()
