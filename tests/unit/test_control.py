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

    def test_status_has_the_dns_numbers_once_there_are_any(self) -> None:
        numbers: list[dict[str, int] | None] = [None]
        protocol = ControlFactory(self.manager, self.spool, dns=lambda: numbers[0]).buildProtocol(None)
        protocol.makeConnection(self.transport)
        self.protocol = protocol
        assert "dns" not in self.ask(command="status")["result"]  # type: ignore[operator]
        numbers[0] = {"questions": 3, "cache_hits": 1, "cached": 3, "in_flight": 0}
        assert self.ask(command="status")["result"]["dns"] == numbers[0]  # type: ignore[index]

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


class ReloadCommandTests(TestCase):
    """`mailgatectl reload` over the control socket."""

    def ask(self, factory: ControlFactory, **request: object) -> dict[str, object]:
        transport = StringTransport()
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(transport)
        protocol.dataReceived(json.dumps(request).encode() + b"\n")
        return json.loads(transport.value())  # type: ignore[no-any-return]

    def factory(self, reload: object = None) -> ControlFactory:
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        spool = MemorySpool(directory=directory)
        manager = QueueManager(
            spool,
            Router(()),
            lambda route: DeferringTransport(),
            lambda m, f: succeed(None),
            DeliveryConfig(),
            Clock(),
        )
        return ControlFactory(manager, spool, reload=reload)  # type: ignore[arg-type]

    def test_reload_runs_the_reload_and_answers_its_summary(self) -> None:
        calls: list[int] = []

        def reload() -> str:
            calls.append(1)
            return "reloaded lists; SIGHUP sent to 1 SMTP worker process(es)"

        answer = self.ask(self.factory(reload), command="reload")
        self.assertEqual(
            answer, {"ok": True, "result": "reloaded lists; SIGHUP sent to 1 SMTP worker process(es)"}
        )
        self.assertEqual(calls, [1])

    def test_a_failed_reload_is_an_error_with_its_reason(self) -> None:
        from gateway.filters.reload import ReloadFailed

        def reload() -> str:
            raise ReloadFailed("filter lists kept its old data: /etc/mailgate/block.txt, line 3: ...")

        answer = self.ask(self.factory(reload), command="reload")
        self.assertFalse(answer["ok"])
        self.assertIn("block.txt, line 3", answer["error"])  # type: ignore[operator]

    def test_without_a_reload_the_gateway_says_so(self) -> None:
        answer = self.ask(self.factory(), command="reload")
        self.assertEqual(answer, {"ok": False, "error": "this gateway has nothing to reload"})


def serve_once(path: str, reply: dict[str, object]) -> tuple[threading.Thread, list[dict[str, object]]]:
    """A control socket that answers one request with `reply`, recording the request."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    requests: list[dict[str, object]] = []

    def answer() -> None:
        conn, _ = server.accept()
        requests.append(json.loads(conn.makefile().readline()))
        conn.sendall(json.dumps(reply).encode() + b"\n")
        conn.close()
        server.close()

    thread = threading.Thread(target=answer)
    thread.start()
    return thread, requests


def test_cli_reload_prints_what_the_gateway_reloaded(tmp_path: os.PathLike[str], capsys: object) -> None:
    config = os.path.join(tmp_path, "m.toml")
    with open(config, "w") as handle:
        handle.write(f'[gateway]\nstate_dir = "{tmp_path}"\n')
    thread, requests = serve_once(
        os.path.join(tmp_path, "control.sock"), {"ok": True, "result": "reloaded lists"}
    )
    assert cli.main(["--config", config, "reload"]) == 0
    thread.join()
    assert requests == [{"command": "reload"}]
    assert capsys.readouterr().out == "reloaded lists\n"  # type: ignore[attr-defined]


def test_cli_reload_failure_is_one_line_and_status_1(tmp_path: os.PathLike[str], capsys: object) -> None:
    config = os.path.join(tmp_path, "m.toml")
    with open(config, "w") as handle:
        handle.write(f'[gateway]\nstate_dir = "{tmp_path}"\n')
    error = "filter lists kept its old data: /etc/block.txt, line 2: one entry per line, not 'a b'"
    thread, _ = serve_once(os.path.join(tmp_path, "control.sock"), {"ok": False, "error": error})
    assert cli.main(["--config", config, "reload"]) == 1
    thread.join()
    assert capsys.readouterr().err == f"mailgatectl: {error}\n"  # type: ignore[attr-defined]


def test_cli_status_prints_the_dns_numbers(tmp_path: os.PathLike[str], capsys: object) -> None:
    config = os.path.join(tmp_path, "m.toml")
    with open(config, "w") as handle:
        handle.write(f'[gateway]\nstate_dir = "{tmp_path}"\n')
    status = {
        "pid": 7,
        "uptime": 12.0,
        "queue": {"incoming": 0},
        "dns": {"questions": 30, "cache_hits": 10, "cached": 25, "in_flight": 2},
    }
    thread, _ = serve_once(os.path.join(tmp_path, "control.sock"), {"ok": True, "result": status})
    assert cli.main(["--config", config, "status"]) == 0
    thread.join()
    assert capsys.readouterr().out.splitlines()[-1] == (  # type: ignore[attr-defined]
        "dns: 30 questions to the name servers, 10 answered from the cache (25 %); "
        "25 answers cached, 2 questions in flight"
    )
