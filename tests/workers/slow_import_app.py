"""The example app after a 2 s import: a WSGI file for a third-party server
(tests/third_party.rs), whose READY=1 must wait for it."""

import time

time.sleep(2)

from example_app import app  # noqa: E402  (imported after the boot delay)

__all__ = ["app"]
