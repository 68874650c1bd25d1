"""Training: the message digest, the Trainer, mailboxes, and ``mailgatectl bayes``."""

from __future__ import annotations

import argparse
import io
import mailbox
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

import pytest
from twisted.internet.defer import Deferred

from gateway.bayes.cli import Progress, add_commands, run
from gateway.bayes.mailboxes import MailboxError, count, find_sources, messages
from gateway.bayes.sqlite import TokenDatabase
from gateway.bayes.store import Learned, MemoryTokenStore, bayes_path
from gateway.bayes.training import Trainer, message_digest, train
from gateway.config import Config, parse
from gateway.content.parse import parse_message

T = TypeVar("T")


def fired(deferred: Deferred[T]) -> T:
    """The result of a Deferred that has fired (everything here is in memory), or its failure raised."""
    outcome: list[Any] = []
    deferred.addBoth(outcome.append)
    assert outcome, "the Deferred should have fired"
    if hasattr(outcome[0], "raiseException"):
        outcome[0].raiseException()
    result: T = outcome[0]
    return result


def message(
    subject: str = "Quarterly report", body: str = "Numbers attached, see you at the meeting."
) -> bytes:
    email = EmailMessage()
    email["From"] = "alice@partner.test"
    email["To"] = "bob@example.com"
    email["Subject"] = subject
    email["Message-ID"] = f"<{abs(hash(subject + body))}@partner.test>"
    email["Date"] = "Mon, 02 Jan 2023 10:00:00 +0000"
    email.set_content(body)
    return email.as_bytes()


def config(tmp_path: Path, bayes: str = "") -> Config:
    text = f'[gateway]\nhostname = "gw.test"\nstate_dir = "{tmp_path}"\n'
    if bayes:
        text += f"[filters]\ninbound = []\n[filters.bayes]\n{bayes}\n"
    return parse(text, "mailgate.toml", base_dir="/")


# --- the digest ---------------------------------------------------------------------


def test_the_digest_ignores_what_gateways_add_on_the_way() -> None:
    raw = message()
    passed = (
        b"Received: from mx.partner.test ([192.0.2.1]) by gw.test; Mon, 2 Jan 2023\r\n"
        b"X-Mailgate-Bayes: 9.50\r\n" + raw.replace(b"Subject: Quarterly", b"Subject: SPAM*** Quarterly")
    )
    assert message_digest(parse_message(raw)) == message_digest(parse_message(passed))


def test_different_messages_have_different_digests() -> None:
    assert message_digest(parse_message(message(body="one"))) != message_digest(
        parse_message(message(body="two"))
    )


# --- the Trainer --------------------------------------------------------------------


def test_training_a_message_learns_its_tokens() -> None:
    store = MemoryTokenStore()
    assert fired(train(store, message(), spam=False)) is Learned.LEARNED
    counts = fired(store.counts(["meeting", "subject:quarterly", "from:addr:partner.test"]))
    assert counts.nham == 1
    assert counts.tokens == {"meeting": (0, 1), "subject:quarterly": (0, 1), "from:addr:partner.test": (0, 1)}


def test_a_quarantined_spam_released_as_ham_is_moved_not_counted_twice() -> None:
    store = MemoryTokenStore()
    trainer = Trainer(store)
    tagged = b"X-Mailgate-Bayes: 7.20\r\n" + message().replace(b"Subject: ", b"Subject: SPAM*** ")
    assert fired(trainer.train(tagged, spam=True)) is Learned.LEARNED  # autolearned or trained as spam
    assert fired(trainer.train(message(), spam=False)) is Learned.RELEARNED  # released as ham
    assert fired(trainer.train(message(), spam=False)) is Learned.ALREADY
    counts = fired(store.counts(["meeting", "subject:spam"]))
    assert (counts.nspam, counts.nham, counts.tokens) == (0, 1, {"meeting": (0, 1)})


def test_forgetting_a_trained_message() -> None:
    store = MemoryTokenStore()
    trainer = Trainer(store)
    fired(trainer.train(message(), spam=True))
    assert fired(trainer.forget(message())) is True
    assert fired(store.stats()).messages == 0


def test_a_custom_subject_tag_is_taken_off_before_learning() -> None:
    store = MemoryTokenStore()
    fired(Trainer(store, subject_prefix="[JUNK] ").train(message(subject="[JUNK] hello"), spam=True))
    assert fired(store.counts(["subject:junk", "subject:hello"])).tokens == {"subject:hello": (1, 0)}


# --- mailboxes -----------------------------------------------------------------------


def make_mailboxes(tmp_path: Path) -> dict[str, Path]:
    box = mailbox.mbox(str(tmp_path / "spam.mbox"))
    for number in range(3):
        box.add(message(subject=f"offer {number}"))
    box.close()
    maildir = mailbox.Maildir(str(tmp_path / "Maildir"))
    maildir.add(message(subject="in cur"))
    maildir.add(message(subject="in new"))
    for key in list(maildir.iterkeys())[:1]:  # one read message moves to cur
        entry = maildir.get_message(key)
        entry.set_subdir("cur")
        maildir[key] = entry
    maildir.close()
    (tmp_path / "eml").mkdir()
    (tmp_path / "eml" / "one.eml").write_bytes(message(subject="eml one"))
    (tmp_path / "eml" / "sub").mkdir()
    (tmp_path / "eml" / "sub" / "two").write_bytes(message(subject="eml two"))
    (tmp_path / "eml" / ".hidden").write_bytes(b"not a message")
    return {"mbox": tmp_path / "spam.mbox", "maildir": tmp_path / "Maildir", "eml": tmp_path / "eml"}


def test_mbox_maildir_and_message_files_are_read(tmp_path: Path) -> None:
    paths = make_mailboxes(tmp_path)
    sources = find_sources([str(paths["mbox"]), str(paths["maildir"]), str(paths["eml"])])
    assert [source.kind for source in sources] == ["mbox", "maildir", "file", "file"]
    assert count(sources) == 7
    subjects = [parse_message(raw).subject for _where, raw in messages(sources)]
    assert subjects[:3] == ["offer 0", "offer 1", "offer 2"]
    assert sorted(subjects[3:5]) == ["in cur", "in new"]
    assert subjects[5:] == ["eml one", "eml two"]


def test_an_mbox_message_does_not_keep_its_from_line(tmp_path: Path) -> None:
    sources = find_sources([str(make_mailboxes(tmp_path)["mbox"])])
    _where, raw = next(messages(sources))
    assert not raw.startswith(b"From ")


def test_a_missing_path_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MailboxError, match=r"nowhere\.mbox: no such file or directory"):
        find_sources([str(tmp_path / "nowhere.mbox")])


# --- mailgatectl bayes ---------------------------------------------------------------


def parse_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mailgatectl")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def command(cfg: Config, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = run(parse_args(*argv), cfg, out, err)
    return status, out.getvalue(), err.getvalue()


def test_train_then_stats(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    paths = make_mailboxes(tmp_path)
    status, out, err = command(cfg, "bayes", "train", "--spam", str(paths["mbox"]))
    assert status == 0
    assert out == "learned 3 new spam; 0 moved from ham to spam; 0 already learned as spam; 0 unreadable\n"
    assert "3/3 100%" in err  # the progress line, at the end
    status, out, _ = command(cfg, "bayes", "train", "--ham", str(paths["maildir"]), str(paths["eml"]))
    assert out == "learned 4 new ham; 0 moved from spam to ham; 0 already learned as ham; 0 unreadable\n"
    status, out, _ = command(cfg, "bayes", "stats")
    assert status == 0
    assert f"token store:   {bayes_path(cfg)}\n" in out
    assert "spam learned:  3\nham learned:   4\n" in out
    assert "messages seen: 7\n" in out


def test_training_again_and_as_the_other_class(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    paths = make_mailboxes(tmp_path)
    command(cfg, "bayes", "train", "--spam", str(paths["mbox"]))
    _, out, _ = command(cfg, "bayes", "train", "--spam", str(paths["mbox"]))
    assert out.startswith("learned 0 new spam; 0 moved from ham to spam; 3 already learned as spam;")
    _, out, _ = command(cfg, "bayes", "train", "--ham", str(paths["mbox"]))
    assert out.startswith("learned 0 new ham; 3 moved from spam to ham;")
    database = TokenDatabase(bayes_path(cfg))
    assert (database.stats().nspam, database.stats().nham) == (0, 3)
    database.close()


def test_forget(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    paths = make_mailboxes(tmp_path)
    command(cfg, "bayes", "train", "--spam", str(paths["mbox"]))
    _, out, _ = command(cfg, "bayes", "forget", str(paths["mbox"]), str(paths["eml"]))
    assert out == "forgot 3 messages; 2 were not learned; 0 unreadable\n"


def test_the_subject_tag_of_the_config_is_taken_off(tmp_path: Path) -> None:
    cfg = config(tmp_path, 'subject_prefix = "[JUNK] "')
    (tmp_path / "one.eml").write_bytes(message(subject="[JUNK] cheap pills"))
    command(cfg, "bayes", "train", "--spam", str(tmp_path / "one.eml"))
    database = TokenDatabase(bayes_path(cfg))
    assert database.counts(["subject:junk", "subject:cheap"]).tokens == {"subject:cheap": (1, 0)}
    database.close()


def test_train_needs_spam_or_ham(capsys: Any) -> None:
    with pytest.raises(SystemExit):
        parse_args("bayes", "train", "x.mbox")
    assert "one of the arguments --spam --ham is required" in capsys.readouterr().err


def test_a_missing_path_is_one_line_and_status_1(tmp_path: Path) -> None:
    status, out, err = command(config(tmp_path), "bayes", "train", "--ham", str(tmp_path / "none"))
    assert (status, out) == (1, "")
    assert err == f"mailgatectl: {tmp_path / 'none'}: no such file or directory\n"


def test_an_unreadable_state_directory_is_one_line_and_status_1(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    status, _, err = command(config(tmp_path / "file"), "bayes", "stats")
    assert status == 1
    assert err.startswith("mailgatectl: cannot open the Bayes token store ")
    assert err[-1] == "\n" and err.count("\n") == 1


# --- the progress display -----------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_is_a_bar_redrawn_in_place() -> None:
    now = [0.0]
    stream = Terminal()
    progress = Progress(4, stream, clock=lambda: now[0])
    for _ in range(4):
        now[0] += 0.5
        progress.step()
    progress.finish()
    assert stream.getvalue().startswith("\r[#######.......................] 1/4  25% 2 msg/s")
    assert stream.getvalue().endswith("\r[##############################] 4/4 100% 2 msg/s\n")


def test_progress_in_a_log_is_a_line_every_few_seconds() -> None:
    now = [0.0]
    stream = io.StringIO()
    progress = Progress(100, stream, clock=lambda: now[0], every=5.0)
    for _ in range(100):
        now[0] += 0.125
        progress.step()
    progress.finish()
    assert stream.getvalue().splitlines() == [
        "[############..................] 40/100  40% 8 msg/s",
        "[########################......] 80/100  80% 8 msg/s",
        "[##############################] 100/100 100% 8 msg/s",
    ]
    assert "\r" not in stream.getvalue()
