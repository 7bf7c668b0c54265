"""A WSGI app whose body is a generator that takes 5 ms to yield its one
chunk: a server sends the headers before the body, in two writes (as a
Flask response's body, an iterable, often is under load). A server that
leaves Nagle's algorithm on (no TCP_NODELAY) holds the body until the
client acknowledges the headers, which a client waiting for the rest of
the response delays (40 ms on Linux). tests/third_party.rs."""

import time


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "6")])
    return _body()


def _body():
    time.sleep(0.005)
    yield b"hello\n"
