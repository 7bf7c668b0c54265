"""The proxy headers of drover-hypercorn and drover-granian, read as
drover-uvicorn reads them (uvicorn's ``--proxy-headers``, the peer without an
address trusted too): neither Hypercorn nor Granian reads them itself, so
behind nginx an app saw ``http`` behind https, and nginx's address as the
client's.

From a trusted peer (one in ``--forwarded-allow-ips``, by default
``$FORWARDED_ALLOW_IPS``, else ``127.0.0.1,::1``; and any peer of a Unix
socket, which has no address to check, as drover-wsgi and Gunicorn trust it):

* ``X-Forwarded-Proto`` (``http``, ``https``, ``ws`` or ``wss``) is the
  scheme (``ws``/``wss`` for a websocket);
* ``X-Forwarded-For`` gives the client address: its rightmost entry that is
  not a trusted peer's (the leftmost with ``*``), so what a client wrote at
  the left of the header is not believed.

From any other peer they change nothing.
"""

from typing import Any, Awaitable, Callable, Dict, Iterable, List, Optional, Tuple

from drover_wsgi.proxy import TrustedPeers, default_allow_ips

SCHEMES = ("http", "https", "ws", "wss")


class Trusted(TrustedPeers):
    """The peers whose proxy headers are believed. ValueError names an entry
    of ``allow_ips`` that is neither an address nor a network."""

    def __contains__(self, host: object) -> bool:
        if not host:
            return True  # a Unix socket's peer: no address to check
        return isinstance(host, str) and super().__contains__(host)

    def client(self, forwarded_for: str) -> Optional[str]:
        """The client address in an ``X-Forwarded-For`` value."""
        hosts = [h.strip() for h in forwarded_for.split(",")]
        if not self.everyone:
            for host in reversed(hosts):
                if host and host not in self:
                    return host
        return hosts[0] or None

    def believe(self, peer: Optional[str], headers: Iterable[Tuple[bytes, bytes]],
                websocket: bool = False) -> Tuple[Optional[str], Optional[str]]:
        """(scheme, client address) that ``peer``'s headers say, each None
        when they say nothing (or ``peer`` is not trusted)."""
        if peer not in self:
            return None, None
        proto: Optional[bytes] = None
        forwarded: List[bytes] = []
        for name, value in headers:
            name = name.lower()
            if name == b"x-forwarded-proto":
                proto = value
            elif name == b"x-forwarded-for":
                forwarded.append(value)
        scheme = proto.decode("latin-1").strip() if proto is not None else None
        if scheme not in SCHEMES:
            scheme = None
        elif websocket and scheme is not None:
            scheme = scheme.replace("http", "ws")
        client = self.client(b", ".join(forwarded).decode("latin-1")) if forwarded else None
        return scheme, client


def believe_in_scope(trusted: Trusted, scope: Dict[str, Any]) -> None:
    """An ASGI scope (http or websocket) as its proxy's headers say."""
    if scope.get("type") not in ("http", "websocket"):
        return
    peer = scope.get("client")
    scheme, client = trusted.believe(peer[0] if peer else None, scope.get("headers") or (),
                                     websocket=scope["type"] == "websocket")
    if scheme is not None:
        scope["scheme"] = scheme
    if client is not None:
        scope["client"] = (client, 0)


def asgi(app: Any, trusted: Trusted) -> Callable[..., Awaitable[Any]]:
    """An ASGI 3 app (or Hypercorn's wrapper of an app, which takes more
    arguments) behind ``trusted``'s proxy headers."""

    async def proxied(scope: Dict[str, Any], receive: Any, send: Any, *more: Any) -> Any:
        believe_in_scope(trusted, scope)
        return await app(scope, receive, send, *more)

    return proxied


def wsgi(app: Any, trusted: Trusted) -> Callable[[Dict[str, Any], Any], Any]:
    """A WSGI app behind ``trusted``'s proxy headers: ``wsgi.url_scheme``
    and ``REMOTE_ADDR``."""

    def proxied(environ: Dict[str, Any], start_response: Any) -> Any:
        headers = []
        for key, name in (("HTTP_X_FORWARDED_PROTO", b"x-forwarded-proto"), ("HTTP_X_FORWARDED_FOR", b"x-forwarded-for")):
            value = environ.get(key)
            if value is not None:
                headers.append((name, value.encode("latin-1")))
        if headers:
            scheme, client = trusted.believe(environ.get("REMOTE_ADDR"), headers)
            if scheme in ("http", "https"):
                environ["wsgi.url_scheme"] = scheme
            if client is not None:
                environ["REMOTE_ADDR"] = client
        return app(environ, start_response)

    return proxied


def trusted_from(args: Any, log: Callable[[str], None]) -> Any:
    """The launcher's ``--proxy-headers``/``--forwarded-allow-ips``: a
    Trusted, None (``--no-proxy-headers``), or False when the setting is
    wrong (logged: the launcher cannot boot)."""
    if not args.proxy_headers:
        return None
    try:
        return Trusted(args.forwarded_allow_ips if args.forwarded_allow_ips is not None else default_allow_ips())
    except ValueError as e:
        log("cannot boot: %s" % e)
        return False
