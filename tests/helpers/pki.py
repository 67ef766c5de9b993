"""The throw-away certificate authority of the TLS tests (broker, receiver, sync); the TLS
benchmark uses it too, so it lives in bench/_pki.py."""

from bench._pki import ThrowAwayCA as TestCA

__all__ = ["TestCA"]
