"""SMTP: the server (front door) and the client and LMTP protocols (transports)."""
