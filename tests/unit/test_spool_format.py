"""Envelope files and queue ids: properties (hypothesis)."""

from __future__ import annotations

import contextlib

import hypothesis.strategies as st
import pytest
from hypothesis import given

from gateway.model import (
    Body,
    Envelope,
    Notify,
    QueuedMessage,
    Recipient,
    RecipientState,
    RecipientStatus,
    Ret,
)
from gateway.queue._format import EnvelopeFormatError, dumps, loads
from gateway.queue._ids import ALPHABET, QueueIds, hash_dirs, is_queue_id

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
maybe_text = st.none() | text
recipients = st.builds(
    Recipient, address=text, notify=st.frozensets(st.sampled_from(Notify)), orcpt=maybe_text
)
envelopes = st.builds(
    Envelope,
    mail_from=text,
    rcpt_to=st.lists(recipients, max_size=4).map(tuple),
    body=st.sampled_from(Body),
    smtputf8=st.booleans(),
    ret=st.none() | st.sampled_from(Ret),
    envid=maybe_text,
    size=st.none() | st.integers(0, 2**40),
    auth=maybe_text,
)
states = st.builds(
    RecipientState,
    recipient=recipients,
    status=st.sampled_from(RecipientStatus),
    attempts=st.integers(0, 1000),
    last_reply=maybe_text,
    relay=maybe_text,
)
finite = st.floats(allow_nan=False, allow_infinity=False)
messages = st.builds(
    QueuedMessage,
    queue_id=st.just("1K0XNBHQJMQ5KD571"),
    envelope=envelopes,
    recipients=st.lists(states, max_size=4).map(tuple),
    arrived=finite,
    size=st.integers(0, 2**40),
    client=text,
    attempts=st.integers(0, 1000),
    next_attempt=finite,
    state=st.sampled_from(["incoming", "active", "deferred", "hold"]),
)


@given(messages, st.integers(1, 2**31))
def test_envelope_files_round_trip(message: QueuedMessage, version: int) -> None:
    data = dumps(message, version, {"peer_host": "192.0.2.1"})
    assert loads(data, message.state) == (message, version, {"peer_host": "192.0.2.1"})


@given(st.binary(max_size=200))
def test_garbage_is_a_format_error_never_something_else(data: bytes) -> None:
    with contextlib.suppress(EnvelopeFormatError):
        loads(data, "incoming")


@pytest.mark.parametrize(
    "document",
    [
        b"[]",
        b'{"format": 2}',
        b'{"format": 1}',
        b'{"format": 1, "envelope": {"mail_from": "a", "rcpt_to": 3}}',
    ],
)
def test_wrong_documents_are_format_errors(document: bytes) -> None:
    with pytest.raises(EnvelopeFormatError):
        loads(document, "incoming")


def test_ids_sort_by_time_and_hash_from_a_slot_that_turns_about_once_a_second() -> None:
    ids = QueueIds()
    made = [ids.next() for _ in range(10_000)]
    assert made == sorted(made) and len(set(made)) == len(made)
    assert all(is_queue_id(queue_id) for queue_id in made)
    # a burst lands in one or two leaf directories: they share directory fsyncs
    assert len({hash_dirs(queue_id, 2) for queue_id in made}) <= 2


@given(st.text(max_size=30))
def test_only_well_formed_ids_are_accepted(candidate: str) -> None:
    if is_queue_id(candidate):
        assert len(candidate) == 17 and set(candidate) <= set(ALPHABET)
