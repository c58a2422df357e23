"""authgate: an authentication gateway for SMTP, IMAP and POP3."""

__version__ = "0.1.0"
