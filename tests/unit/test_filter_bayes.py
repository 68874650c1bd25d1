"""The "bayes" filter: scores, thresholds (global and per domain), training floor, autolearning, failures."""

from __future__ import annotations

import io
import re
from email.message import EmailMessage
from typing import Any, TypeVar

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from zope.interface.verify import verifyObject

from gateway.bayes.policy import Policy, Thresholds
from gateway.bayes.sqlite import SqliteTokenStore
from gateway.bayes.store import MemoryTokenStore, TokenCounts
from gateway.bayes.training import Trainer
from gateway.config import ConfigError, parse
from gateway.content import MessageContent, ParsedMessage
from gateway.filters import FilterServices, Request
from gateway.filters.bayes import Autolearn, Bayes
from gateway.filters.chain import Hit
from gateway.interfaces import IAcceptObserver, IFilter
from gateway.model import CONTINUE, Action, Direction, Envelope, Recipient, Session, Stage, Verdict
from gateway.smtp.reply import Reply
from gateway.state import StoreError
from tests.unit.reception_driver import Driver

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


SENDER = "someone@sender.test"
SPAM_WORDS = "cheap pills casino viagra winner prize claim offer unsubscribe"
HAM_WORDS = "meeting agenda minutes project review lunch thanks deadline draft"


def raw_message(body: str, subject: str = "hello", number: int = 0) -> bytes:
    email = EmailMessage()
    email["From"] = SENDER
    email["To"] = "bob@example.com"
    email["Subject"] = subject
    email["Message-ID"] = f"<{number}.{abs(hash(body))}@sender.test>"
    email.set_content(body)
    return email.as_bytes()


SPAM = raw_message(f"{SPAM_WORDS} {SPAM_WORDS}", "You are a winner")
HAM = raw_message(f"{HAM_WORDS}", "project meeting")
UNSURE = raw_message(f"{SPAM_WORDS} {HAM_WORDS}", "hello")


def trained_store(spams: int = 5, hams: int = 5) -> MemoryTokenStore:
    store = MemoryTokenStore(Clock())
    trainer = Trainer(store)
    for number in range(spams):
        fired(trainer.train(raw_message(f"{SPAM_WORDS} n{number}", "winner", number), spam=True))
    for number in range(hams):
        fired(trainer.train(raw_message(f"{HAM_WORDS} n{number}", "meeting", number), spam=False))
    return store


def bayes(store: Any = None, **options: Any) -> Bayes:
    store = store if store is not None else trained_store()
    options.setdefault("min_training", 5)
    return Bayes(lambda: store, **options)


def request(raw: bytes, *recipients: str) -> Request:
    recipients = recipients or ("bob@example.com",)
    return Request(
        Stage.DATA,
        Direction.INBOUND,
        Session("192.0.2.10"),
        Envelope(SENDER, tuple(Recipient(address) for address in recipients)),
        message=MessageContent.from_bytes(raw),
    )


def decided(result: Verdict | Deferred[Verdict]) -> Verdict:
    """A check's verdict (the memory store answers at once)."""
    return result if isinstance(result, Verdict) else fired(result)


def check(filter: Bayes, raw: bytes, *recipients: str) -> Verdict:
    return decided(filter.check(request(raw, *recipients)))


def score_of(filter: Bayes, raw: bytes) -> float:
    """The filter's score, whatever its thresholds (one that tags everything)."""
    verdict = check(
        Bayes(filter._store, min_training=filter.min_training, policy=Policy(Thresholds(0, 10, 10))), raw
    )
    return verdict.score


# --- what users see -----------------------------------------------------------------


def test_provides_filter_and_accept_observer_at_data() -> None:
    filter = bayes()
    assert verifyObject(IFilter, filter)
    assert verifyObject(IAcceptObserver, filter)
    assert filter.stages == frozenset({Stage.DATA})


def test_spam_is_deleted_ham_passes() -> None:
    filter = bayes()
    spam = check(filter, SPAM)
    assert spam.action is Action.DISCARD
    assert spam.score > 9.0
    assert spam.reason == f"Bayes score {spam.score:.2f}"
    assert check(filter, HAM).action is Action.CONTINUE


def test_the_score_decides_tag_quarantine_or_delete() -> None:
    score = score_of(bayes(), SPAM)
    just_below, just_above = score - 0.01, score + 0.01
    tag = check(bayes(policy=Policy(Thresholds(just_below, just_above, just_above))), SPAM)
    assert tag.action is Action.TAG
    assert tag.subject_prefix == "SPAM*** "
    assert tag.headers == (("X-Mailgate-Bayes", f"{score:.2f}"),)
    assert tag.score == score
    quarantine = check(bayes(policy=Policy(Thresholds(0, just_below, just_above))), SPAM)
    assert (quarantine.action, quarantine.score) == (Action.QUARANTINE, score)
    assert check(bayes(policy=Policy(Thresholds(0, 0, just_below))), SPAM).action is Action.DISCARD
    assert check(bayes(policy=Policy(Thresholds(score, 10, 10))), SPAM).action is Action.CONTINUE  # "above"


def test_a_message_with_no_evidence_scores_five_which_is_not_above_five() -> None:
    unknown = ParsedMessage(headers=(("Subject", "xyzzy"),), text="plugh frobozz")
    content = MessageContent(1, lambda: io.BytesIO(b"x"), lambda raw: unknown)
    nothing = Request(Stage.DATA, Direction.INBOUND, Session("192.0.2.10"), message=content)
    assert decided(bayes().check(nothing)) == CONTINUE  # the default tag threshold is 5: "above 5"
    tagged = decided(bayes(policy=Policy(Thresholds(4.99, 10, 10))).check(nothing))
    assert (tagged.action, tagged.score) == (Action.TAG, 5.0)


def test_tag_text_and_header_are_configurable() -> None:
    filter = bayes(policy=Policy(Thresholds(0, 10, 10)), subject_prefix="[SPAM] ", header="X-Spam-Bayes")
    verdict = check(filter, SPAM)
    assert verdict.subject_prefix == "[SPAM] "
    assert verdict.headers[0][0] == "X-Spam-Bayes"
    assert check(bayes(policy=Policy(Thresholds(0, 10, 10)), header=""), SPAM).headers == ()


def test_clean_mail_gets_only_the_header_when_asked() -> None:
    verdict = check(bayes(header_on_clean=True), HAM)
    assert verdict.action is Action.TAG
    assert (verdict.score, verdict.subject_prefix) == (0.0, "")
    assert verdict.headers[0][0] == "X-Mailgate-Bayes"
    assert float(verdict.headers[0][1]) < 1.0


# --- the training floor ----------------------------------------------------------------


def test_no_verdict_until_enough_spam_and_ham_are_learned() -> None:
    filter = bayes(trained_store(spams=5, hams=4), min_training=5)
    assert check(filter, SPAM).action is Action.CONTINUE
    header_only = check(bayes(trained_store(5, 4), min_training=5, header_on_clean=True), SPAM)
    assert header_only.action is Action.TAG and header_only.score == 0.0
    assert header_only.headers == (
        ("X-Mailgate-Bayes", "untrained (5 spam and 4 ham learned, 5 of each needed)"),
    )
    assert check(bayes(trained_store(5, 5), min_training=5), SPAM).action is Action.DISCARD


# --- per-domain thresholds -------------------------------------------------------------


def domains_filter() -> tuple[Bayes, float]:
    score = score_of(bayes(), SPAM)
    lenient = Thresholds(10, 10, 10)  # never acts
    tagging = Thresholds(score - 0.01, 10, 10)
    quarantining = Thresholds(0, score - 0.01, 10)
    deleting = Thresholds(0, 0, score - 0.01)
    policy = Policy(
        Thresholds(10, 10, 10),
        {"lenient.test": lenient, "tag.test": tagging, "hold.test": quarantining, "delete.test": deleting},
    )
    return bayes(policy=policy), score


def test_a_domain_uses_its_own_thresholds_and_its_sub_domains_too() -> None:
    filter, _ = domains_filter()
    assert check(filter, SPAM, "a@tag.test").action is Action.TAG
    assert check(filter, SPAM, "a@hold.test").action is Action.QUARANTINE
    assert check(filter, SPAM, "a@mail.delete.test").action is Action.DISCARD
    assert check(filter, SPAM, "a@other.test").action is Action.CONTINUE  # the global ones


def test_mixed_domains_get_the_strictest_action_but_deletion_needs_them_all() -> None:
    filter, _ = domains_filter()
    assert check(filter, SPAM, "a@lenient.test", "b@tag.test").action is Action.TAG
    assert check(filter, SPAM, "a@tag.test", "b@hold.test").action is Action.QUARANTINE
    # one recipient's domain would delete, another's only tag: kept in the quarantine
    assert check(filter, SPAM, "a@delete.test", "b@tag.test").action is Action.QUARANTINE
    assert check(filter, SPAM, "a@delete.test", "b@lenient.test").action is Action.QUARANTINE
    assert check(filter, SPAM, "a@delete.test", "b@x.delete.test").action is Action.DISCARD


def test_policy_rule_by_itself() -> None:
    policy = Policy(Thresholds(), {"strict.test": Thresholds(2, 3, 4)})
    assert policy.action(3.5, ["a@strict.test"]) is Action.QUARANTINE
    assert policy.action(3.5, ["a@other.test"]) is Action.CONTINUE
    assert policy.action(9.5, []) is Action.DISCARD  # no recipients: the global thresholds
    assert policy.action(5.0, ["a@strict.test", "b@STRICT.TEST."]) is Action.DISCARD


# --- the store ----------------------------------------------------------------------------


class BrokenStore(MemoryTokenStore):
    def counts(self, tokens: Any) -> Deferred[TokenCounts]:
        return fail(StoreError("the Bayes token store /var/lib/mailgate/bayes.sqlite: disk I/O error"))


def test_a_store_that_fails_fails_the_check() -> None:
    result = bayes(BrokenStore()).check(request(SPAM))
    assert isinstance(result, Deferred)
    failures: list[Any] = []
    result.addErrback(failures.append)
    assert failures and failures[0].check(StoreError)


def test_a_store_failure_is_the_chain_failure_verdict_not_a_pass() -> None:
    gateway = Driver("[filters]\ninbound = []", appended={Direction.INBOUND: (bayes(BrokenStore()),)})
    reply = deliver(gateway, SPAM)
    assert (reply.code, reply.enhanced) == (451, "4.3.0")
    assert reply.text.startswith("Temporary failure in filter")
    assert gateway.spool.messages == {}


def test_the_store_is_opened_at_the_first_check_in_the_state_directory(tmp_path: Any) -> None:
    reactor = MemoryReactorClock()  # type: ignore[no-untyped-call]
    filter = Bayes.from_config(options(""), FilterServices(config(state_dir=str(tmp_path)), reactor))
    assert reactor.triggers == {}  # nothing opened while the chain is built
    store = filter.store
    assert isinstance(store, SqliteTokenStore)
    assert store.path == str(tmp_path / "bayes.sqlite")
    assert filter.store is store  # once
    assert reactor.triggers["before"]["shutdown"]  # closed with the gateway


# --- through the reception ----------------------------------------------------------------


def deliver(gateway: Driver, raw: bytes, recipients: tuple[str, ...] = ("bob@example.com",)) -> Reply:
    session = Session("192.0.2.10")
    checks = gateway.reception.open_session(session)
    envelope = Envelope(SENDER, ())
    assert fired(checks.mail(session, envelope)) is None
    for address in recipients:
        assert fired(checks.rcpt(session, envelope, Recipient(address))) is None
        envelope = Envelope(SENDER, (*envelope.rcpt_to, Recipient(address)))
    message = checks.new_message(session)
    message.write(b"Received: from client.sender.test ([192.0.2.10]) by gw.test; Mon, 2 Jan 2023\r\n")
    message.write(raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    reply = fired(checks.accept(session, envelope, message))
    checks.close()
    assert isinstance(reply, Reply)
    return reply


def test_a_tagged_message_is_queued_with_the_subject_tag_and_the_header() -> None:
    filter = bayes(policy=Policy(Thresholds(0, 10, 10)))
    gateway = Driver("[filters]\ninbound = []", appended={Direction.INBOUND: (filter,)})
    assert deliver(gateway, SPAM).code == 250
    [queue_id] = gateway.spool.messages
    stored = gateway.spool.message_bytes(queue_id)
    assert b"\r\nSubject: SPAM*** You are a winner\r\n" in stored
    header = stored.split(b"\r\n")[1]
    assert re.fullmatch(rb"X-Mailgate-Bayes: (9\.9\d|10\.00)", header), stored


# --- autolearning -------------------------------------------------------------------------


def autolearning(store: MemoryTokenStore, **options: Any) -> Bayes:
    return bayes(
        store, autolearn=Autolearn(True, options.pop("ham", 1.0), options.pop("spam", 9.5)), **options
    )


def new_spam(number: int) -> bytes:
    return raw_message(f"{SPAM_WORDS} fresh{number}", "winner", 100 + number)


def test_autolearning_learns_sure_spam_once_the_gateway_is_done_with_it() -> None:
    store = trained_store()
    gateway = Driver("[filters]\ninbound = []", appended={Direction.INBOUND: (autolearning(store),)})
    assert deliver(gateway, new_spam(1)).code == 250  # deleted: the client is told 250
    assert gateway.spool.messages == {}
    assert store.nspam == 6
    assert fired(store.counts(["fresh1"])).tokens == {"fresh1": (1, 0)}


def test_autolearning_learns_sure_ham_only_when_no_other_filter_objected() -> None:
    store = trained_store()
    filter = autolearning(store)
    clean = raw_message(f"{HAM_WORDS} fresh", "meeting", 200)
    sure = request(clean)
    assert decided(filter.check(sure)).action is Action.CONTINUE
    other = Hit("spamassassin", Stage.DATA, Action.TAG, "SPAM", 6.1, 0.01)
    filter.message_accepted(sure, (other,), False)
    assert store.nham == 5  # another filter thought it spammy: not learned
    again = request(clean)
    decided(filter.check(again))
    filter.message_accepted(again, (), True)
    assert store.nham == 5  # held by someone: not learned
    third = request(clean)
    decided(filter.check(third))
    filter.message_accepted(third, (), False)
    assert store.nham == 6


def test_a_failed_filter_means_the_ham_was_not_really_checked() -> None:
    store = trained_store()
    filter = autolearning(store)
    clean = request(raw_message(f"{HAM_WORDS} fresh", "meeting", 201))
    decided(filter.check(clean))
    failed = Hit("clamav", Stage.DATA, Action.CONTINUE, "", 0.0, 30.0, failed=True)
    filter.message_accepted(clean, (failed,), False)
    assert store.nham == 5


def test_uncertain_calls_are_never_learned() -> None:
    store = trained_store()
    filter = autolearning(store, policy=Policy(Thresholds(10, 10, 10)))
    score = score_of(filter, UNSURE)
    assert 1.0 <= score <= 9.5
    unsure = request(UNSURE)
    decided(filter.check(unsure))
    filter.message_accepted(unsure, (), False)
    filter.message_refused(unsure, ())
    assert (store.nspam, store.nham) == (5, 5)


def test_autolearning_is_off_by_default_and_never_before_the_training_floor() -> None:
    store = trained_store()
    gateway = Driver("[filters]\ninbound = []", appended={Direction.INBOUND: (bayes(store),)})
    deliver(gateway, new_spam(2))
    assert store.nspam == 5
    floor = trained_store(5, 4)
    gateway = Driver("[filters]\ninbound = []", appended={Direction.INBOUND: (autolearning(floor),)})
    deliver(gateway, new_spam(3))
    assert floor.nspam == 5


def test_a_ham_refused_by_another_filter_is_not_learned() -> None:
    store = trained_store()
    filter = autolearning(store)
    clean = request(raw_message(f"{HAM_WORDS} fresh", "meeting", 202))
    decided(filter.check(clean))
    filter.message_refused(clean, (Hit("clamav", Stage.DATA, Action.REJECT, "virus", 0.0, 0.1),))
    assert store.nham == 5


# --- the options ------------------------------------------------------------------------


def config(filters: str = "", state_dir: str = "/nonexistent") -> Any:
    return parse(
        f'[gateway]\nhostname = "gw.test"\nstate_dir = "{state_dir}"\n[filters]\ninbound = []\n{filters}',
        "mailgate.toml",
        base_dir="/",
    )


def options(text: str) -> Any:
    cfg = config(f"[filters.bayes]\n{text}")
    return cfg.filters.section(cfg.source, "bayes")


def from_config(text: str = "") -> Bayes:
    section = options(text)
    built = Bayes.from_config(section, FilterServices(config(), Clock()))
    section.done()
    return built


def test_defaults() -> None:
    filter = from_config()
    assert filter.policy == Policy(Thresholds(5.0, 7.0, 9.0), {})
    assert (filter.subject_prefix, filter.header, filter.header_on_clean) == (
        "SPAM*** ",
        "X-Mailgate-Bayes",
        False,
    )
    assert filter.min_training == 200
    assert filter.autolearn == Autolearn(False, 1.0, 9.5)


def test_every_option_is_read() -> None:
    filter = from_config(
        'tag = 4\nquarantine = 6.5\ndelete = 10\nsubject_prefix = "[SPAM] "\nheader = "X-Bayes"\n'
        "header_on_clean = true\nmin_training = 50\nautolearn = true\nautolearn_ham = 0.5\n"
        "autolearn_spam = 9.9\n"
        '[filters.bayes.domains."Partner.Test"]\ntag = 3\n[filters.bayes.domains."strict.test"]\ndelete = 8\n'
    )
    assert filter.policy == Policy(
        Thresholds(4.0, 6.5, 10.0),
        {"partner.test": Thresholds(3.0, 6.5, 10.0), "strict.test": Thresholds(4.0, 6.5, 8.0)},
    )
    assert (filter.subject_prefix, filter.header, filter.header_on_clean) == ("[SPAM] ", "X-Bayes", True)
    assert filter.min_training == 50
    assert filter.autolearn == Autolearn(True, 0.5, 9.9)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("tag = 8", "filters.bayes.tag: thresholds must rise: tag (8) <= quarantine (7) <= delete (9)"),
        ("delete = 11", "filters.bayes.tag: delete must be a score from 0 to 10, not 11"),
        ('tag = "high"', "filters.bayes.tag: must be a number, not a string"),
        ("min_training = 0", "filters.bayes.min_training: must be at least 1"),
        ("autolearn_ham = 6", "filters.bayes.autolearn_ham: must be from 0 to the tag threshold (5)"),
        (
            "autolearn_spam = 6",
            "filters.bayes.autolearn_spam: must be from the quarantine threshold (7) to 10",
        ),
        ('header = "X Bad: header"', "filters.bayes.header: must be a header field name"),
        ('colour = "red"', "filters.bayes.colour: unknown key"),
        (
            '[filters.bayes.domains."a.test"]\nquarantine = 2',
            "filters.bayes.domains.a.test.tag: thresholds must rise",
        ),
        ('[filters.bayes.domains."a.test"]\nspam = 2', "filters.bayes.domains.a.test.spam: unknown key"),
        (
            '[filters.bayes.domains]\n"a.test" = 3',
            "filters.bayes.domains.a.test: must be a table of thresholds",
        ),
    ],
)
def test_bad_options_are_refused_with_the_key(text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        from_config(text)
