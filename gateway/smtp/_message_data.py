"""The SMTP server's message data: DATA and BDAT, read into the spool as they arrive.

A mixin of `gateway.smtp.server.SmtpServerProtocol`. The message goes to the
spool (`IncomingMessage`) in large chunks after our Received header; on the way
its bytes are checked (size, hops, bare CR / LF: `gateway.smtp._data`) and, for
mail from the Internet, forged X-Mailgate-* fields are stripped from its header.
A transaction that fails is read to its end (CRLF.CRLF, or the LAST chunk) and
answered then, so the byte stream is never lost track of.
"""

from __future__ import annotations

import re
from typing import cast

from twisted.internet.defer import maybeDeferred
from twisted.python.failure import Failure

from gateway.model import Body, Role
from gateway.smtp._conversation import TEMPORARY, Conversation, Mode, describe, log
from gateway.smtp._data import DotReader, HeaderScanner, HeaderStripper, NewlineChecker, normalize_newlines
from gateway.smtp._session import IncomingMessage, received_header
from gateway.smtp.reply import Reply

_BDAT = re.compile(r"([0-9]{1,20})( +LAST)? *\Z", re.IGNORECASE)


class MessageData(Conversation):
    """DATA and BDAT: from the command to the reception's answer at the end of the message."""

    _message: IncomingMessage | None  # ours until handed to accept()
    _failure: Reply | None  # the transaction failed; say so at its end
    _size: int
    _reader: DotReader
    _newlines: NewlineChecker
    _headers: HeaderScanner
    _stripper: HeaderStripper | None  # forged X-Mailgate-* fields out (Internet mail)
    _chunk_left: int
    _chunk_size: int
    _chunk_last: bool
    _chunk_error: Reply | None
    _carry: bytes  # a CR at the end of a BDAT chunk, until the next byte
    _queue_id_kept: str  # of an aborted or handed-over message, for the log

    def _init_message_data(self) -> None:
        self._message = None
        self._failure = None
        self._size = 0
        self._reader = DotReader(self.settings.data_chunk_size)
        self._newlines = NewlineChecker()
        self._headers = HeaderScanner()
        self._stripper = None
        self._chunk_left = 0
        self._chunk_size = 0
        self._chunk_last = False
        self._chunk_error = None
        self._carry = b""
        self._queue_id_kept = ""

    # --- the commands ----------------------------------------------------------------

    def _transaction_error(self) -> Reply | None:
        if self._envelope is None:
            return Reply(503, "5.5.1", "Error: need MAIL command")
        if not self._envelope.rcpt_to:
            return Reply(554, "5.5.1", "Error: no valid recipients")
        return None

    def _data(self, argument: str) -> Reply | None:
        if argument.strip(" "):
            return Reply(501, "5.5.4", "Syntax: DATA")
        error = self._transaction_error()
        if error is not None:
            return error
        assert self._envelope is not None
        if self._envelope.body is Body.BINARY:
            return Reply(503, "5.5.1", "Error: BODY=BINARYMIME needs BDAT")
        if self._message is not None:
            return Reply(503, "5.5.1", "Error: DATA inside a BDAT transfer")
        error = self._start_message()
        if error is not None:
            self._reset_transaction()
            return error
        self._reader = DotReader(self.settings.data_chunk_size)
        self._mode = Mode.DATA
        return Reply(354, None, "End data with <CR><LF>.<CR><LF>")

    def _bdat(self, argument: str) -> Reply | None:
        match = _BDAT.match(argument)
        if match is None:
            # the chunk size is unknown, so the byte stream cannot be followed
            self._log_reject(describe("BDAT", argument), Reply(501, "5.5.4", "bad BDAT syntax"))
            self._shutdown(Reply(501, "5.5.4", "Syntax: BDAT size [LAST]; closing"))
            return None
        self._chunk_left = self._chunk_size = int(match.group(1))
        self._chunk_last = match.group(2) is not None
        if self._chunk_left == 0 and not self._chunk_last:
            pass  # an empty chunk counts as a command (a flood of them is bounded)
        else:
            self._commands -= 1  # chunks that carry data are bounded by the size limit
        self._chunk_error = self._bdat_error()
        self._mode = Mode.BDAT
        return None

    def _bdat_error(self) -> Reply | None:
        if not self.session.esmtp:
            return Reply(503, "5.5.1", "Error: send EHLO first")
        error = self._transaction_error()
        if error is not None:
            return error
        if self._size + self._chunk_left > self.settings.max_message_size:
            return Reply(552, "5.3.4", "Message size exceeds fixed limit")
        if self._message is None:
            return self._start_message()
        return None

    # --- reading -------------------------------------------------------------------

    def _start_message(self) -> Reply | None:
        """Open the spool file and write our Received header; a Reply if that failed."""
        envelope = self._envelope
        assert envelope is not None
        try:
            message = cast(IncomingMessage, self.checks.new_message(self.session))
            self._message = message
            message.write(
                received_header(
                    self.session,
                    envelope,
                    hostname=self.settings.hostname,
                    queue_id=message.queue_id,
                    now=self.server.clock.seconds(),
                )
                + self.checks.header_block()
            )
        except Exception:
            log.failure("smtpd: cannot start a message for [{peer}]", peer=self.session.peer_host)
            self._abort_message()
            return TEMPORARY
        self._size = 0
        self._failure = None
        self._newlines = NewlineChecker()
        self._headers = HeaderScanner()
        internet = self.session.role is Role.INBOUND and not self.session.may_relay
        self._stripper = HeaderStripper() if internet else None
        self._carry = b""
        return None

    def _step_data(self) -> bool:
        start = self._pos
        content, self._pos, finished = self._reader.read(self._buffer, start)
        if content:
            self._take(content, text=True)
        if finished:
            self._mode = Mode.COMMAND
            self._end_of_message("DATA")
        return finished or self._pos != start

    def _step_bdat(self) -> bool:
        if self._chunk_left:
            available = len(self._buffer) - self._pos
            if not available:
                return False
            count = min(available, self._chunk_left)
            chunk = bytes(self._buffer[self._pos : self._pos + count])
            self._pos += count
            self._chunk_left -= count
            if self._chunk_error is None:
                self._take_bdat(chunk)
            if self._chunk_left:
                return True
        self._mode = Mode.COMMAND
        self._end_chunk()
        return True

    def _take_bdat(self, chunk: bytes) -> None:
        assert self._envelope is not None
        if self._envelope.body is Body.BINARY:
            self._take(chunk, text=False)
            return
        chunk = self._carry + chunk
        self._carry = b""
        if chunk.endswith(b"\r") and not (self._chunk_last and self._chunk_left == 0):
            self._carry, chunk = b"\r", chunk[:-1]  # its LF may start the next chunk
        if chunk:
            self._take(chunk, text=True)

    def _take(self, content: bytes, *, text: bool) -> None:
        """Message bytes from the client: check them and hand them to the spool."""
        if self._failure is not None or self._message is None:
            return  # already failed: read to the end, keep nothing
        self._size += len(content)
        if self._size > self.settings.max_message_size:
            self._fail(Reply(552, "5.3.4", "Message size exceeds fixed limit"))
            return
        if text and self._newlines.feed(content):
            if self.settings.reject_bare_lf:
                self._fail(Reply(550, "5.5.2", "Error: bare CR or LF in message data"))
                return
            content = normalize_newlines(content)
        self._headers.feed(content)
        if self._headers.done and self._headers.received > self.settings.max_hops:
            self._fail(Reply(554, "5.4.6", "Too many hops: mail forwarding loop"))
            return
        if self._stripper is not None:
            content = self._stripper.feed(content)
        try:
            self._message.write(content)
        except Exception:
            log.failure("smtpd: {queue_id}: cannot write the message", queue_id=self._queue_id())
            self._fail(TEMPORARY)

    def _fail(self, reply: Reply) -> None:
        """The transaction failed: keep reading to its end, then answer ``reply``."""
        self._failure = reply
        self._abort_message(keep_id=True)

    # --- the end -------------------------------------------------------------------

    def _end_chunk(self) -> None:
        if self._chunk_error is not None:
            error, self._chunk_error = self._chunk_error, None
            self._reply_failed("BDAT", error)
            return
        if self._failure is not None:
            self._reply_failed("BDAT", self._failure)
            return
        if not self._chunk_last:
            self._reply(Reply(250, "2.0.0", f"{self._chunk_size} octets received"), "BDAT")
            return
        if self._carry:
            carry, self._carry = self._carry, b""
            self._take(carry, text=True)
        self._end_of_message("BDAT")

    def _end_of_message(self, command: str) -> None:
        envelope, message = self._envelope, self._message
        failure = self._failure
        if failure is None and self._headers.finish() > self.settings.max_hops:
            failure = Reply(554, "5.4.6", "Too many hops: mail forwarding loop")
        if failure is None and message is not None and self._stripper is not None:
            try:
                message.write(self._stripper.finish())
            except Exception:
                log.failure("smtpd: {queue_id}: cannot write the message", queue_id=self._queue_id())
                failure = TEMPORARY
        if failure is not None or envelope is None or message is None:
            self._reply_failed(command, failure or TEMPORARY)
            return
        self._message = None  # from here on, the reception owns it
        queue_id = self._queue_id_kept = str(message.queue_id)

        def failed(failure: Failure) -> Reply:
            log.failure("smtpd: {queue_id}: accept failed", failure, queue_id=queue_id)
            return TEMPORARY

        def accepted(reply: Reply) -> Reply:
            if reply.is_positive:
                self._messages += 1
            self._envelope = None
            self._size = 0
            return reply

        accept = maybeDeferred(self.checks.accept, self.session, envelope, message)
        self._wait(accept.addErrback(failed), accepted, command)

    def _reply_failed(self, command: str, failure: Reply) -> None:
        """End a failed transaction: answer (logged with its queue id), then forget it."""
        self._abort_message(keep_id=True)
        self._reply(failure, command)
        self._reset_transaction()

    # --- the message's state -------------------------------------------------------

    def _abort_message(self, *, keep_id: bool = False) -> None:
        message, self._message = self._message, None
        if message is None:
            return
        if keep_id:
            self._queue_id_kept = str(message.queue_id)
        try:
            message.abort()
        except Exception:
            log.failure("smtpd: aborting message {queue_id} failed", queue_id=message.queue_id)

    def _forget_message(self) -> None:
        """The transaction is over: drop its message (if still ours) and what was read of it."""
        self._abort_message()
        self._failure = None
        self._size = 0
        self._carry = b""
        self._queue_id_kept = ""
        self._chunk_error = None

    def _queue_id(self) -> str:
        if self._message is not None:
            return str(self._message.queue_id)
        return self._queue_id_kept
