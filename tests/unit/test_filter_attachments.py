"""The "attachments" filter: what mail with programs, archives, bombs and macros gets."""

from __future__ import annotations

import email.policy
import io
import threading
from email.message import EmailMessage
from typing import Any

import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from gateway.config import ConfigError, Section
from gateway.content import Attachment, MessageContent, ParsedMessage
from gateway.filters import FilterServices, Request
from gateway.filters._archives import ArchiveLimits
from gateway.filters.attachments import Attachments, Policy, ThreadRunner
from gateway.interfaces import IFilter
from gateway.model import Action, Direction, Envelope, Recipient, Session, Stage, Verdict
from gateway.reception import Reception
from gateway.smtp.reply import Reply
from tests.unit.attachment_samples import (
    doc_with_macros,
    doc_without_macros,
    docm,
    docx,
    encrypted_docx,
    make_7z,
    make_rar,
    make_zip,
    overlapping_zip,
)
from tests.unit.reception_driver import Driver, config, fired

PROGRAM = b"MZ\x90\x00" + b"\0" * 60
CLIENT = Session("192.0.2.10")


def parsed(*files: tuple[str | None, bytes], truncated: bool = False) -> ParsedMessage:
    attachments = tuple(
        Attachment(name, "application/octet-stream", payload, depth=1) for name, payload in files
    )
    return ParsedMessage((("Subject", "files"),), "see attached", attachments, truncated=truncated)


def request_for(message: ParsedMessage) -> Request:
    content = MessageContent(0, lambda: io.BytesIO(b""), lambda raw: message)
    envelope = Envelope("alice@partner.test", (Recipient("bob@example.com"),))
    return Request(Stage.DATA, Direction.INBOUND, CLIENT, envelope, message=content)


def check(*files: tuple[str | None, bytes], policy: Policy | None = None, truncated: bool = False) -> Verdict:
    answer = Attachments(policy or Policy()).check(request_for(parsed(*files, truncated=truncated)))
    return fired(answer)


def mime(*files: tuple[str, bytes], content_type: str = "application/octet-stream") -> bytes:
    message = EmailMessage()
    message["From"] = "alice@partner.test"
    message["To"] = "bob@example.com"
    message["Subject"] = "files"
    message.set_content("see attached")
    for name, payload in files:
        main, sub = content_type.split("/")
        message.add_attachment(payload, maintype=main, subtype=sub, filename=name)
    return message.as_bytes(policy=email.policy.SMTP)


def options(text: str) -> Section:
    cfg = config(f"[filters]\ninbound = []\n[filters.attachments]\n{text}")
    return cfg.filters.section(cfg.source, "attachments")


def from_config(text: str = "") -> Attachments:
    section = options(text)
    cfg = config("")
    built = Attachments.from_config(section, FilterServices(cfg, Clock()))
    section.done()
    return built


# --- what users see ----------------------------------------------------------------


def test_provides_filter_at_data() -> None:
    assert verifyObject(IFilter, Attachments())
    assert Attachments.stages == frozenset({Stage.DATA})


def test_clean_attachments_pass() -> None:
    assert check(
        ("report.pdf", b"%PDF-1.7 ..."), ("notes.txt", b"hello"), ("a.zip", make_zip([("b.txt", b"x")]))
    )
    assert check(("report.pdf", b"%PDF-1.7")).action is Action.CONTINUE
    assert check(("letter.docx", docx()), ("old.doc", doc_without_macros())).action is Action.CONTINUE


@pytest.mark.parametrize(
    "name", ["setup.exe", "run.SCR", "invoice.js", "x.vbs", "link.lnk", "disk.iso", "a.hta"]
)
def test_blocked_names_are_refused(name: str) -> None:
    verdict = check((name, b"anything"))
    assert verdict.action is Action.REJECT
    assert verdict.reason.startswith(f"Attachment refused: {name}: blocked name (.")


def test_a_program_disguised_by_its_name_is_refused() -> None:
    verdict = check(("photo.jpg", PROGRAM))
    assert verdict == Verdict.reject("Attachment refused: photo.jpg: a Windows program named .jpg")


def test_a_program_with_no_name_is_refused() -> None:
    verdict = check((None, b"\x7fELF\x02\x01\x01"))
    assert verdict.action is Action.REJECT
    assert "a Linux program with no extension" in verdict.reason


def test_double_extensions_and_hidden_extensions_are_refused() -> None:
    policy = Policy(blocked_extensions=frozenset())  # even where .exe is allowed
    verdict = check(("invoice.pdf.exe", b"text"), policy=policy)
    assert verdict == Verdict.reject("Attachment refused: invoice.pdf.exe: double extension (.pdf.exe)")
    assert check(("invoice\u202efdp.txt", b"text"), policy=policy).action is Action.REJECT


def test_a_program_inside_nested_archives_is_named_by_its_path() -> None:
    inner = make_zip([("evil.exe", PROGRAM)])
    outer = make_zip([("readme.txt", b"hi"), ("inner.7z", make_7z([("inner.zip", inner)]))])
    verdict = check(("invoice.zip", outer))
    assert verdict.action is Action.REJECT
    assert "invoice.zip/inner.7z/inner.zip/evil.exe: blocked name (.exe)" in verdict.reason


def test_programs_inside_rar_archives_are_found() -> None:
    verdict = check(("docs.rar", make_rar([("scan.pdf", PROGRAM)])))
    assert verdict.reason == "Attachment refused: docs.rar/scan.pdf: a Windows program named .pdf"


def test_an_encrypted_archive_is_quarantined_by_default() -> None:
    verdict = check(("secret.zip", make_zip([("a.txt", b"x")], encrypt=("a.txt",))))
    assert verdict == Verdict(Action.QUARANTINE, "attachment held: secret.zip/a.txt: encrypted")
    assert (
        check(("h.7z", make_7z([("a.txt", b"x")], password="pw", headers=True))).action is Action.QUARANTINE
    )


def test_an_encrypted_member_is_still_judged_by_its_name() -> None:
    verdict = check(("secret.zip", make_zip([("run.exe", PROGRAM)], encrypt=("run.exe",))))
    assert verdict.action is Action.REJECT  # reject beats quarantine
    assert verdict.reason == (
        "Attachment refused: secret.zip/run.exe: encrypted; secret.zip/run.exe: blocked name (.exe)"
    )


@pytest.mark.parametrize(
    "setting,action", [("allow", Action.CONTINUE), ("tag", Action.TAG), ("reject", Action.REJECT)]
)
def test_the_encrypted_policy_is_followed(setting: str, action: Action) -> None:
    verdict = check(
        ("s.zip", make_zip([("a.txt", b"x")], encrypt=("a.txt",))), policy=Policy(encrypted=setting)
    )
    assert verdict.action is action


def test_a_tag_adds_a_header_naming_the_findings() -> None:
    verdict = check(
        ("s.zip", make_zip([("a.txt", b"x")], encrypt=("a.txt",))), policy=Policy(encrypted="tag")
    )
    assert verdict.headers == (("X-Mailgate-Attachments", "s.zip/a.txt: encrypted"),)


def test_office_documents_with_macros_are_quarantined() -> None:
    assert check(("invoice.doc", doc_with_macros())) == Verdict(
        Action.QUARANTINE, "attachment held: invoice.doc: Office document with macros"
    )
    assert check(("invoice.docm", docm())).action is Action.QUARANTINE
    zipped = check(("invoice.zip", make_zip([("invoice.docm", docm())])))
    assert zipped.reason == "attachment held: invoice.zip/invoice.docm: Office document with macros"
    assert check(("invoice.doc", doc_with_macros()), policy=Policy(macros="allow")).action is Action.CONTINUE


def test_an_encrypted_office_document_is_treated_as_encrypted() -> None:
    assert check(("pay.docx", encrypted_docx())) == Verdict(
        Action.QUARANTINE, "attachment held: pay.docx: encrypted document"
    )


def test_a_zip_bomb_is_refused_unopened() -> None:
    verdict = check(("big.zip", make_zip([("zeros.bin", b"\0" * 3_000_000)])))
    assert verdict.action is Action.REJECT
    assert verdict.reason.startswith(
        "Attachment refused: big.zip: refused unopened: the archive is compressed"
    )
    assert check(("o.zip", overlapping_zip())).action is Action.REJECT


def test_archive_limits_come_from_the_policy() -> None:
    archive = make_zip([(f"f{n}.txt", b"x") for n in range(5)])
    assert check(("a.zip", archive)).action is Action.CONTINUE
    limited = check(("a.zip", archive), policy=Policy(limits=ArchiveLimits(max_files=4)))
    assert limited == Verdict.reject("Attachment refused: a.zip: refused unopened: more than 4 files")


def test_an_unreadable_archive_or_document_is_quarantined() -> None:
    assert check(("a.zip", b"PK\x03\x04garbage")) == Verdict(
        Action.QUARANTINE, "attachment held: a.zip: archive cannot be read: File is not a zip file"
    )
    assert check(("a.doc", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\xff" * 600)).action is Action.QUARANTINE


def test_oversize_attachments_and_truncated_messages() -> None:
    policy = Policy(max_attachment_size=10)
    assert check(("a.txt", b"x" * 11), policy=policy) == Verdict.reject(
        "Attachment refused: a.txt: 11 bytes, more than 10"
    )
    assert check(("a.txt", b"x" * 10), policy=policy).action is Action.CONTINUE
    assert check(truncated=True) == Verdict(
        Action.QUARANTINE,
        "attachment held: (message): not inspected whole (over a [content] limit: size, parts or depth)",
    )


def test_a_long_list_of_findings_is_cut_short_in_the_reason() -> None:
    verdict = check(*[(f"x{n}.exe", b"") for n in range(8)])
    assert verdict.reason.endswith("x4.exe: blocked name (.exe); and 3 more")


def test_a_message_without_content_is_not_judged() -> None:
    request = Request(Stage.DATA, Direction.INBOUND, CLIENT, Envelope("a@b.test", ()))
    assert Attachments().check(request) == Verdict(Action.CONTINUE)


def test_a_bug_fails_the_check_instead_of_passing_the_mail(monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.filters.attachments as module

    def broken(*args: object) -> object:
        raise RuntimeError("a bug")

    monkeypatch.setattr(module, "list_archive", broken)
    answer = Attachments().check(request_for(parsed(("a.zip", make_zip([("a.txt", b"x")])))))
    failures: list[object] = []
    answer.addErrback(failures.append)  # type: ignore[union-attr]
    assert len(failures) == 1  # the chain runner turns it into the failure verdict


# --- real MIME, through the shared parse -------------------------------------------


def mime_check(raw: bytes, policy: Policy | None = None) -> Verdict:
    envelope = Envelope("alice@partner.test", (Recipient("bob@example.com"),))
    request = Request(Stage.DATA, Direction.INBOUND, CLIENT, envelope, message=MessageContent.from_bytes(raw))
    return fired(Attachments(policy or Policy()).check(request))


def test_real_mime_with_a_zipped_program() -> None:
    raw = mime(("invoice.zip", make_zip([("invoice.pdf.exe", PROGRAM)])))
    verdict = mime_check(raw)
    assert verdict.action is Action.REJECT
    assert "invoice.zip/invoice.pdf.exe: blocked name (.exe)" in verdict.reason
    assert "invoice.zip/invoice.pdf.exe: double extension (.pdf.exe)" in verdict.reason


def test_real_mime_with_an_encoded_word_file_name() -> None:
    raw = mime(("r\u00e9sum\u00e9.exe", b"x"))
    assert "=?utf-8?" in raw.decode() or "filename*=" in raw.decode()
    assert mime_check(raw).reason == "Attachment refused: r\u00e9sum\u00e9.exe: blocked name (.exe)"


def test_real_mime_with_broken_base64_still_judges_the_name() -> None:
    raw = mime(("tool.exe", PROGRAM)).replace(b"TVqQAAAAAAAAAAAA", b"TVq*!AA@AAAA")
    assert mime_check(raw).action is Action.REJECT


def test_real_mime_with_a_declared_program_content_type() -> None:
    raw = mime(("readme", b"plain words"), content_type="application/x-msdownload")
    assert mime_check(raw) == Verdict.reject(
        "Attachment refused: readme: blocked content type (application/x-msdownload)"
    )


# --- acceptance: held in the quarantine, refused at the end of data ---------------------


def deliver(gateway: Driver, raw: bytes) -> Reply:
    checks = gateway.reception.open_session(CLIENT)
    envelope = Envelope("alice@partner.test", (Recipient("bob@example.com"),))
    message = checks.new_message(CLIENT)
    message.write(raw)
    return fired(checks.accept(CLIENT, envelope, message))


def test_encrypted_zip_macro_document_and_zip_bomb_as_configured_and_in_the_quarantine() -> None:
    gateway = Driver("[filters]\ninbound = []\n", appended={Direction.INBOUND: (Attachments(),)})
    assert deliver(gateway, mime(("s.zip", make_zip([("a.pdf", b"%PDF")], encrypt=("a.pdf",))))).code == 250
    assert deliver(gateway, mime(("invoice.xlsm", docm()))).code == 250
    refused = deliver(gateway, mime(("bomb.zip", make_zip([("zeros", b"\0" * 3_000_000)]))))
    assert (refused.code, refused.enhanced) == (554, "5.7.1")
    assert "bomb.zip: refused unopened" in refused.text
    held = sorted(
        (message.quarantine.reason for message in gateway.spool.messages.values() if message.quarantine),
    )
    assert held == [
        "attachment held: invoice.xlsm: Office document with macros",
        "attachment held: s.zip/a.pdf: encrypted",
    ]
    assert all(message.state == "hold" for message in gateway.spool.messages.values())


def test_a_kept_copy_of_a_refused_bomb_is_in_the_quarantine_for_review() -> None:
    gateway = Driver("[filters]\ninbound = []\n", appended={Direction.INBOUND: (Attachments(),)})
    gateway.reception = Reception(gateway.spool, gateway.config.relay, gateway.runner, keep_rejected=True)
    deliver(gateway, mime(("bomb.zip", make_zip([("zeros", b"\0" * 3_000_000)]))))
    [message] = gateway.spool.messages.values()
    assert message.quarantine is not None and message.quarantine.kind == "rejected"


# --- configuration -------------------------------------------------------------------


def test_options_are_read_and_checked() -> None:
    built = from_config(
        'blocked_extensions = [".EXE", "com"]\nencrypted = "reject"\nmax_depth = 2\n'
        'max_total_size = "10M"\nmax_attachment_size = "1M"\nthreads = 0\nheader = "X-Attach"'
    )
    assert built.policy.blocked_extensions == frozenset({"exe", "com"})
    assert built.policy.encrypted == "reject"
    assert built.policy.limits == ArchiveLimits(max_depth=2, max_total_size=10 * 1024 * 1024)
    assert built.policy.max_attachment_size == 1024 * 1024
    assert built.policy.header == "X-Attach"
    assert from_config().policy == Policy()
    assert isinstance(from_config().run, ThreadRunner)


@pytest.mark.parametrize(
    "text,problem",
    [
        ('macros = "delete"', "filters.attachments.macros: must be one of allow, tag, quarantine, reject"),
        ('blocked_types = ["virus"]', "unknown type 'virus'"),
        ("max_depth = 0", "must be at least 1"),
        ('header = "Bad Header:"', "is not a header field name"),
        ("threads = -1", "must be 0"),
    ],
)
def test_bad_options_name_the_key_and_line(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        from_config(text)
    assert problem in str(raised.value)
    assert "mailgate.toml, line" in str(raised.value)


class _Reactor:
    """What ThreadRunner needs of a reactor: results handed back, shutdown triggers."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...]]] = []
        self.triggers: list[tuple[str, str, Any]] = []

    def callFromThread(self, function: Any, *arguments: Any) -> None:
        self.calls.append((function, arguments))

    def addSystemEventTrigger(self, phase: str, event: str, function: Any) -> None:
        self.triggers.append((phase, event, function))


def test_the_thread_runner_inspects_off_the_reactor_thread() -> None:
    reactor = _Reactor()
    runner = ThreadRunner(reactor, 1)
    answer = runner(lambda: threading.current_thread().name)
    [(phase, event, stop)] = reactor.triggers
    assert (phase, event) == ("during", "shutdown")
    stop()  # joins the worker: the call has run
    for function, arguments in reactor.calls:
        function(*arguments)
    assert "mailgate-attachments" in fired(answer)
