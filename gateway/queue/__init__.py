"""The durable spool: one function enqueues, states are directories."""

from gateway.queue._format import open_message

__all__ = ["open_message"]
