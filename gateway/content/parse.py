"""parse_message: raw bytes -> ParsedMessage, bounded by ContentLimits (placeholder until written)."""

from __future__ import annotations

from gateway.content import ContentLimits, ParsedMessage


def parse_message(raw: bytes, limits: ContentLimits = ContentLimits()) -> ParsedMessage:
    raise NotImplementedError("gateway.content.parse.parse_message is being written")
