"""The durable spool: one function enqueues, states are directories."""
