"""MailGate: a bastion mail gateway on Twisted."""

__version__ = "0.1.0"
