"""apps:app, with drover_wsgi's proxy hook broken at import: a stand-in for
a failure of the server's own while it builds a request's environ."""

from apps import app  # noqa: F401

import drover_wsgi.proxy


def _broken(self, headers):
    raise RuntimeError("the scheme hook broke")


drover_wsgi.proxy.Proxy.scheme = _broken  # type: ignore[method-assign]
