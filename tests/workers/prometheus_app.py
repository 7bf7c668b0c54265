"""A WSGI app in prometheus_client's multiprocess mode, with the recipe of
docs/migrating-from-gunicorn.md: each worker marks itself dead in its
cleanup registry, so that the live gauge counts the workers alive.
tests/third_party.rs."""

import os

os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

import drover_worker  # noqa: E402
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, multiprocess  # noqa: E402

REQUESTS = Counter("app_requests", "requests served")
LIVE = Gauge("app_live_workers", "workers alive", multiprocess_mode="livesum")
LIVE.inc()

drover_worker.on_exit(lambda: multiprocess.mark_process_dead(os.getpid()), name="prometheus-mark-dead")


def app(environ, start_response):
    if environ["PATH_INFO"] == "/metrics":
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        body = generate_latest(registry)
    else:
        REQUESTS.inc()
        body = b"hello from pid %d\n" % os.getpid()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
