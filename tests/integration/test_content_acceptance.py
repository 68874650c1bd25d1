"""Issue 4's acceptance, with the real gateway, spamd and clamd: each kind of bad mail is
handled as configured and visible in the quarantine; Bayes is trained from a mailbox;
releasing a false positive delivers it and trains Bayes; a scanner that stops defers mail."""

from __future__ import annotations

import mailbox
import os
import smtplib
from collections.abc import Iterator
from email.message import EmailMessage
from email.policy import SMTP

import pytest

from tests.integration.gateway import GatewayProcess, maildir_messages, running_gateway, wait_until
from tests.integration.peer_clamd import EICAR, Clamd
from tests.integration.peer_spamd import Spamd
from tests.integration.peers import require_program
from tests.unit.attachment_samples import docm, make_zip

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
SPAM_WORDS = [
    "代开发票",
    "优惠",
    "低价",
    "联系电话",
    "增值税",
    "点击链接",
    "免费领取",
    "中奖",
    "微信",
    "返利",
]
HAM_WORDS = [
    "会议纪要",
    "项目进度",
    "周报",
    "预算审批",
    "合同",
    "客户拜访",
    "测试报告",
    "部署",
    "培训",
    "季度总结",
]


def chinese(words: list[str], number: int) -> EmailMessage:
    message = EmailMessage(policy=SMTP)
    message["From"] = f"sender{number}@outside.test"
    message["To"] = "bob@example.com"
    message["Subject"] = f"{words[number % len(words)]} {words[(number * 3 + 1) % len(words)]}"
    body = "，".join(words[(number + i) % len(words)] for i in range(6)) + "。请回复。"  # noqa: RUF001
    message.set_content(body, charset="gb18030")  # GB text, as Chinese spam comes
    return message


def message(
    subject: str, text: str = "hello", attachments: tuple[tuple[str, bytes], ...] = ()
) -> EmailMessage:
    built = EmailMessage(policy=SMTP)
    built["From"] = "alice@outside.test"
    built["To"] = "bob@example.com"
    built["Subject"] = subject
    built.set_content(text)
    for name, payload in attachments:
        built.add_attachment(payload, maintype="application", subtype="octet-stream", filename=name)
    return built


def _nested(depth: int) -> bytes:
    head = b"From: a@outside.test\r\nTo: bob@example.com\r\nSubject: nested\r\nMIME-Version: 1.0\r\n"
    opening = b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (level, level)
        for level in range(depth)
    )
    closing = b"".join(b"\r\n--b%d--\r\n" % level for level in reversed(range(depth)))
    return head + opening + b"Content-Type: text/plain\r\n\r\ndeep\r\n" + closing


HOSTILE = {
    "deep nesting": _nested(2000),
    "broken base64": (
        b"From: a@outside.test\r\nTo: bob@example.com\r\nSubject: broken\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"SGVsbG8g!!!d29y*bGQ=\r\n=====\r\n"
    ),
    "wrong charset": (
        b"From: a@outside.test\r\nTo: bob@example.com\r\nSubject: =?x-unknown?B?SGVsbG8=?=\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=big5\r\n\r\n"
        + "这是简体中文，用 GB18030 写的。".encode("gb18030")  # noqa: RUF001
        + b"\r\n"
    ),
}


def send_raw(gateway: GatewayProcess, raw: bytes) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", gateway.smtp_port, timeout=60, source_address=("127.0.0.2", 0)) as client:
        client.ehlo("mx.outside.test")
        try:
            client.sendmail("alice@outside.test", ["bob@example.com"], raw)
        except smtplib.SMTPResponseException as error:
            return error.smtp_code, error.smtp_error.decode()
    return 250, ""


def send(gateway: GatewayProcess, built: EmailMessage) -> tuple[int, str]:
    """From 127.0.0.2 (not in relay.networks: the inbound chain); the end-of-data reply."""
    with smtplib.SMTP("127.0.0.1", gateway.smtp_port, timeout=60, source_address=("127.0.0.2", 0)) as client:
        client.ehlo("mx.outside.test")
        try:
            client.sendmail("alice@outside.test", ["bob@example.com"], built.as_bytes())
        except smtplib.SMTPDataError as error:
            return error.smtp_code, error.smtp_error.decode()
        except smtplib.SMTPResponseException as error:
            return error.smtp_code, error.smtp_error.decode()
    return 250, ""


@pytest.fixture(scope="module")
def scanners() -> Iterator[tuple[Spamd, Clamd]]:
    for program in ("spamd", "clamd", "sigtool"):
        require_program(program)
    spamd, clamd = Spamd(), Clamd(stream_max_length="10M")
    spamd.start(timeout=90)
    clamd.start(timeout=60)
    yield spamd, clamd
    spamd.stop()
    clamd.stop()


def config(spamd: Spamd, clamd: Clamd) -> str:
    return f"""
    [filters]
    inbound = ["clamav", "attachments", "spamassassin", "bayes"]
    [filters.clamav]
    server = "{clamd.unix_endpoint}"
    action = "quarantine"
    notify = []
    [filters.spamassassin]
    server = "{spamd.endpoint}"
    delete_action = "quarantine"
    [filters.bayes]
    min_training = 20
    delete = 10.0
    [quarantine]
    keep_rejected = true
    """


def quarantined(gateway: GatewayProcess) -> dict[str, str]:
    """queue id -> the quarantine line with its reason, from `mailgatectl quarantine list`."""
    rows: dict[str, str] = {}
    current = ""
    for line in gateway.ctl("quarantine", "list").stdout.splitlines():
        fields = line.split()
        if fields and len(fields[0]) >= 12 and fields[0].isalnum() and fields[0].isupper():
            current = fields[0]
            rows[current] = line
        elif current:
            rows[current] += " | " + line.strip()
    return rows


def test_bad_mail_is_quarantined_as_configured_and_a_release_delivers_and_trains(
    scanners: tuple[Spamd, Clamd], tmp_path: os.PathLike[str]
) -> None:
    spamd, clamd = scanners
    directory = str(tmp_path)
    spam_box, ham_box = mailbox.mbox(f"{directory}/spam.mbox"), mailbox.mbox(f"{directory}/ham.mbox")
    for number in range(30):
        spam_box.add(chinese(SPAM_WORDS, number).as_bytes())
        ham_box.add(chinese(HAM_WORDS, number).as_bytes())
    spam_box.flush()
    ham_box.flush()

    with running_gateway(directory, extra=config(spamd, clamd)) as gateway:
        trained = gateway.ctl("bayes", "train", "--spam", f"{directory}/spam.mbox")
        assert "[" + "#" * 30 + "] 30/30 100%" in trained.stdout + trained.stderr  # the progress bar
        gateway.ctl("bayes", "train", "--ham", f"{directory}/ham.mbox")
        stats = gateway.ctl("bayes", "stats").stdout
        assert "spam learned:  30\n" in stats and "ham learned:   30\n" in stats, stats

        cases = {
            "gtube": message("GTUBE test", f"this is spam\n{GTUBE}\n"),
            "eicar": message("your invoice", "see attached", (("invoice.txt", EICAR),)),
            "encrypted": message(
                "the files",
                "password is 1234",
                (("files.zip", make_zip([("a.txt", b"x")], encrypt=("a.txt",))),),
            ),
            "macro": message("order form", "please fill in", (("order.docm", docm()),)),
            "chinese": chinese(SPAM_WORDS, 99),
        }
        for name, built in cases.items():
            code, text = send(gateway, built)
            assert code == 250, f"{name}: {code} {text}"
        bomb = message(
            "backup", "the backup", (("backup.zip", make_zip([("zeros.bin", bytes(20_000_000))])),)
        )
        code, text = send(gateway, bomb)
        assert code == 554, text  # refused at once: never unpacked

        clean_code, _ = send(gateway, message("lunch", "shall we have lunch at noon?"))
        assert clean_code == 250
        for name, raw in HOSTILE.items():  # parsed as far as it goes, by every filter: nothing crashes
            code, text = send_raw(gateway, raw)
            assert code == 250, f"{name}: {code} {text}"

        wait_until(lambda: len(quarantined(gateway)) == 7)
        rows = list(quarantined(gateway).values())
        expected = {
            "gtube": "spamassassin",
            "eicar": "Eicar-Test-Signature",
            "encrypted": "encrypted",
            "macro": "macro",
            "chinese": "bayes",
            "bomb": "rejected",
            "deep nesting": "not inspected whole",  # attachments' truncated = "quarantine"
        }
        for name, needle in expected.items():
            assert any(needle.lower() in row.lower() for row in rows), f"{name}: {needle!r} not in {rows}"

        # virus statistics by name (the SMTP worker reports its counts every 5 s)
        wait_until(lambda: "Eicar-Test-Signature.UNOFFICIAL: 1" in gateway.ctl("status").stdout)

        mailbox_dir = os.path.join(directory, "mail", "example.com", "bob")
        # the clean message and the hostile ones the parse could read whole
        wait_until(lambda: len(maildir_messages(mailbox_dir)) == len(HOSTILE))
        delivered = len(maildir_messages(mailbox_dir))

        # the Chinese message was a false positive after all: release it and teach Bayes
        [chinese_id] = [queue_id for queue_id, row in quarantined(gateway).items() if "bayes" in row.lower()]
        shown = gateway.ctl("quarantine", "show", chinese_id).stdout
        assert "filter:     bayes=quarantine" in shown
        gateway.ctl("quarantine", "train-ham", chinese_id)
        wait_until(lambda: len(maildir_messages(mailbox_dir)) == delivered + 1)
        assert chinese_id not in quarantined(gateway)
        stats = gateway.ctl("bayes", "stats").stdout
        assert "spam learned:  30\n" in stats and "ham learned:   31\n" in stats, (
            stats
        )  # and the released one

        # a scanner that stops: mail is deferred, never passed unscanned
        spamd.stop()
        code, text = send(gateway, message("after spamd stopped", "hello again"))
        assert 400 <= code < 500, text
        clamd.stop()
        code, text = send(gateway, message("after clamd stopped", "hello again"))
        assert 400 <= code < 500, text
        gateway.wait_for_log("clamav")
        assert len(maildir_messages(mailbox_dir)) == delivered + 1
