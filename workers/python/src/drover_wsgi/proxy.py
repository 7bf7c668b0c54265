"""Behind a proxy: which peers may say the request came over HTTPS, with
Gunicorn's settings and meaning.

* ``forwarded_allow_ips`` (default ``$FORWARDED_ALLOW_IPS``, else
  ``127.0.0.1,::1``): addresses or CIDR networks, comma separated, or ``*``.
  Only these peers' ``secure_scheme_headers`` and ``forwarder_headers`` are
  believed. A Unix-socket peer is always trusted (it has no address to check;
  Gunicorn does the same).
* ``secure_scheme_headers`` (default ``X-FORWARDED-PROTOCOL=ssl``,
  ``X-FORWARDED-PROTO=https``, ``X-FORWARDED-SSL=on``): a header with its
  value makes ``wsgi.url_scheme`` "https"; present with another value, "http";
  two of them that disagree make the request a 400 (the server logs what
  each said).
* ``forwarder_headers`` (default ``SCRIPT_NAME,PATH_INFO``): header names with
  an underscore that a trusted proxy may set. ``SCRIPT_NAME`` becomes the
  environ's ``SCRIPT_NAME`` (and is cut from the front of ``PATH_INFO``);
  others become ``HTTP_<NAME>``. From anyone else, such headers are dropped.

The ``SCRIPT_NAME`` environment variable of the worker (drover's ``[env]``,
Gunicorn's ``raw_env``) mounts the app under that prefix, as Gunicorn does:
it is cut from the front of ``PATH_INFO`` of every request, unless a trusted
proxy sent a ``SCRIPT_NAME`` header (which wins); a path outside it is a 500.

``X-Forwarded-For`` and ``X-Forwarded-Host`` are passed on as
``HTTP_X_FORWARDED_FOR`` and ``HTTP_X_FORWARDED_HOST`` and change nothing
else, as in Gunicorn: ``REMOTE_ADDR`` is the peer's address (log the header
with ``%({x-forwarded-for}i)s``, or let a middleware such as Werkzeug's
ProxyFix read it).
"""

import ipaddress
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .http import HTTPError

DEFAULT_SECURE_SCHEME_HEADERS = {"X-FORWARDED-PROTOCOL": "ssl", "X-FORWARDED-PROTO": "https", "X-FORWARDED-SSL": "on"}
DEFAULT_FORWARDER_HEADERS = "SCRIPT_NAME,PATH_INFO"

_Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def mount_from_env(app: Any, script_name: Optional[str] = None) -> Any:
    """``app`` under the prefix of the ``SCRIPT_NAME`` environment variable,
    as Gunicorn mounts it (``app`` itself when it is unset or empty)."""
    prefix = os.environ.get("SCRIPT_NAME", "") if script_name is None else script_name
    if not prefix:
        return app

    def mounted(environ: Dict[str, Any], start_response: Any) -> Any:
        if not environ.get("SCRIPT_NAME"):  # a trusted proxy's SCRIPT_NAME header wins
            path = environ["PATH_INFO"]
            if not path.startswith(prefix):
                raise ValueError("the request path %r does not start with SCRIPT_NAME %r (the environment "
                                 "variable)" % (path, prefix))
            environ["SCRIPT_NAME"] = prefix
            environ["PATH_INFO"] = path[len(prefix):]
        return app(environ, start_response)

    return mounted


def default_allow_ips() -> str:
    return os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")


def parse_allow_ips(text: str) -> Tuple[bool, List[_Network]]:
    """(everyone, networks) from a forwarded_allow_ips value; ValueError names
    the entry that is neither an address nor a network."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if "*" in items:
        return True, []
    nets = []
    for item in items:
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError("forwarded_allow_ips: %r is not an IP address or network" % item) from None
    return False, nets


def parse_scheme_headers(text: str) -> Dict[str, str]:
    """``NAME=VALUE,NAME=VALUE`` (or "" for none) as Gunicorn's dict."""
    out = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError("secure_scheme_headers: %r is not NAME=VALUE" % item)
        out[name.strip().upper()] = value.strip()
    return out


class TrustedPeers:
    """The peers of a forwarded_allow_ips value, for a lookup per connection:
    ``host in peers`` for an address as accept() gives it. ValueError names
    an entry that is neither an address nor a network."""

    def __init__(self, allow_ips: str) -> None:
        self.everyone, self.networks = parse_allow_ips(allow_ips)
        self._cache: Dict[str, bool] = {}

    def __contains__(self, host: str) -> bool:
        if self.everyone:
            return True
        known = self._cache.get(host)
        if known is None:
            try:
                addr = ipaddress.ip_address(host.split("%", 1)[0])
            except ValueError:
                known = False
            else:
                if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                    addr = addr.ipv4_mapped
                known = any(addr in net for net in self.networks)
            if len(self._cache) < 4096:  # bounded: clients are many, proxies few
                self._cache[host] = known
        return known


class Proxy:
    """The trust settings, prepared for a lookup per request."""

    def __init__(self, allow_ips: Optional[str] = None,
                 secure_scheme_headers: Optional[Dict[str, str]] = None,
                 forwarder_headers: str = DEFAULT_FORWARDER_HEADERS) -> None:
        self.peers = TrustedPeers(default_allow_ips() if allow_ips is None else allow_ips)
        self.everyone, self.networks = self.peers.everyone, self.peers.networks
        headers = DEFAULT_SECURE_SCHEME_HEADERS if secure_scheme_headers is None else secure_scheme_headers
        # As environ keys: X-FORWARDED-PROTO -> HTTP_X_FORWARDED_PROTO.
        self.secure: Sequence[Tuple[str, str]] = [
            ("HTTP_" + name.upper().replace("-", "_"), value) for name, value in headers.items()]
        #: Each secure scheme header's name as a log line names it (X-Forwarded-Proto).
        self.names = {"HTTP_" + name.upper().replace("-", "_"): "-".join(w.capitalize() for w in name.split("-"))
                      for name in headers}
        self.forwarders = {n.strip().upper() for n in forwarder_headers.split(",") if n.strip()}

    def trusts(self, peer: Any) -> bool:
        """Whether the peer (an accept() address) may set the headers."""
        if not isinstance(peer, tuple):
            return True  # a Unix socket: no address to check
        return peer[0] in self.peers

    def scheme(self, headers: Dict[str, str]) -> Optional[str]:
        """"https", "http", or None when no secure scheme header is present
        (from a trusted peer). Raises HTTPError(400) when two disagree."""
        found = None
        for key, value in self.secure:
            sent = headers.get(key)
            if sent is None:
                continue
            scheme = "https" if sent == value else "http"
            if found is not None and found != scheme:
                raise HTTPError(400, "the secure scheme headers disagree: " + self._said(headers))
            found = scheme
        return found

    def _said(self, headers: Dict[str, str]) -> str:
        """What each secure scheme header sent says: ``X-Forwarded-Proto:
        https says https, X-Forwarded-Ssl: off says http``."""
        said = []
        for key, value in self.secure:
            sent = headers.get(key)
            if sent is not None:
                shown = sent if len(sent) <= 64 else sent[:64] + "..."
                said.append("%s: %s says %s" % (self.names[key], shown, "https" if sent == value else "http"))
        return ", ".join(said)
