"""Delivery: the router, the transports, the queue manager and bounces."""
