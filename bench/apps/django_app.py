"""The Django app of the preload scenario: a default project made by
`django-admin startproject benchsite` (the harness makes it, with
ALLOWED_HOSTS = ["*"], and puts it on PYTHONPATH), served as is: / is
Django's own page (DEBUG is on, as startproject leaves it). This wrapper only
adds X-Worker-Pid to every response and answers /sleep?ms=N itself (the
start-up probe), as bench_app does.
"""

import os
import time

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchsite.settings")

from django.core.wsgi import get_wsgi_application  # noqa: E402

_django = get_wsgi_application()


def app(environ, start_response):
    pid = str(os.getpid())
    if environ.get("PATH_INFO") == "/sleep":
        ms = 0
        for part in environ.get("QUERY_STRING", "").split("&"):
            if part.startswith("ms="):
                ms = int(part[3:] or 0)
        time.sleep(ms / 1000.0)
        body = b"slept %d ms" % ms
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body))),
                                  ("X-Worker-Pid", pid)])
        return [body]

    def with_pid(status, headers, exc_info=None):
        return start_response(status, list(headers) + [("X-Worker-Pid", pid)], exc_info)

    return _django(environ, with_pid)
