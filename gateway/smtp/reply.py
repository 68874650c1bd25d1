"""SMTP replies as values: a code, an enhanced status code and text.

Verdicts and errors are carried as `Reply` objects, never as raw strings, and
turned into wire bytes in exactly one place (`Reply.to_bytes`).
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Reply:
    """One SMTP reply (RFC 5321 section 4.2), possibly multi-line."""

    code: int
    enhanced: str | None  # "2.1.0" (RFC 3463), or None for 220/221-style greetings
    text: str = ""

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def lines(self) -> list[str]:
        return self.text.split("\n") if self.text else [""]

    def to_bytes(self, *, enhanced: bool = True) -> bytes:
        """The reply on the wire, CRLF-terminated, continuation lines with '-'."""
        lines = self.lines()
        out = []
        for number, line in enumerate(lines):
            sep = " " if number == len(lines) - 1 else "-"
            if enhanced and self.enhanced:
                line = f"{self.enhanced} {line}" if line else self.enhanced
            out.append(f"{self.code}{sep}{line}".rstrip() + "\r\n")
        return "".join(out).encode("utf-8", "replace")

    def __str__(self) -> str:
        return " ".join(
            part for part in (str(self.code), self.enhanced, self.text.replace("\n", " ")) if part
        )


def temporary(text: str, enhanced: str = "4.3.0") -> Reply:
    """A 451 reply: something on our side failed, the client should retry."""
    return Reply(451, enhanced, text)
