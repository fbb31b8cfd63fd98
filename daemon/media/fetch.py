"""Fetch a media URL safely: public addresses only, bounded in time, size and redirects.

``fetch(url, policy, into)`` writes the body of an http or https URL to a file, or raises ``FetchError``
whose text is a reason fit to show the person who sent the URL ("could not be fetched: connection
refused", "resolves to a link-local address (169.254.169.254), which is not allowed").

What it guards against, and how:

- Requests to the inside of the network (server-side request forgery). Each host name is resolved
  once, every address it resolves to is checked, and the socket is connected to an address that was
  checked; the request then carries the name in the Host header and the TLS SNI. A name that resolves
  to a public address when checked and to 127.0.0.1 when used (DNS rebinding) cannot slip through,
  because there is no second lookup. Addresses refused unless the operator allows them by name or
  range: loopback, private, link-local (169.254.169.254 included), multicast, reserved, unspecified,
  and IPv6 forms that embed such an IPv4 address (IPv4-mapped, 6to4, NAT64).
- Redirects are followed by hand, at most ``max_redirects`` of them, each hop checked as above.
- Slow servers: a connect timeout, a timeout per read, and a total deadline that covers headers and
  body, so a server that trickles one byte a second cannot hold the request forever.
- Large bodies: a Content-Length above the cap is refused before reading; otherwise the body is copied
  to the file in 64 KiB pieces (never held whole in memory) and the fetch stops as soon as it passes
  the cap.

Blocking sockets throughout: the daemon runs under gevent's monkey patching, where they yield.
"""

from __future__ import annotations

import base64
import http.client
import io
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, BinaryIO, cast
from urllib.parse import quote, unquote, urljoin, urlsplit

import gevent

Resolver = Callable[[str, int], list[str]]
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

REDIRECT_STATUSES = (301, 302, 303, 307, 308)
CHUNK = 64 * 1024
# Percent-encode only what may not appear in a request target; keep what the sender already escaped.
_SAFE_IN_PATH = "/%:@!$&'()*+,;=-._~?"
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class FetchError(ValueError):
    """The URL could not be fetched or is not allowed; ``str()`` is the reason, for the user."""


@dataclass(frozen=True)
class FetchPolicy:
    """The limits one fetch runs under."""

    max_bytes: int = 50 * 1024 * 1024
    connect_timeout: float = 5.0
    read_timeout: float = 15.0
    total_timeout: float = 60.0
    max_redirects: int = 3
    allow_private: tuple[str, ...] = ()
    user_agent: str = "callbridge-media/1"

    @classmethod
    def from_settings(cls, settings: Any) -> FetchPolicy:
        """The policy from the ``media_*`` settings (``media_total_timeout`` is optional, 60 s)."""
        return cls(
            max_bytes=settings.media_max_bytes,
            connect_timeout=settings.media_connect_timeout,
            read_timeout=settings.media_read_timeout,
            total_timeout=settings.media_total_timeout,
            max_redirects=settings.media_max_redirects,
            allow_private=tuple(settings.media_allow_private),
        )


def default_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to for a TCP connection, in the system's preferred order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: dict[str, None] = {}
    for info in infos:
        seen.setdefault(str(info[4][0]), None)
    return list(seen)


# Address policy -----------------------------------------------------------------------------------

def _embedded_ipv4(addr: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, when it is one of the forms that reach IPv4."""
    if isinstance(addr, ipaddress.IPv4Address):
        return None
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def non_public_kind(addr: Address) -> str | None:
    """A word for why ``addr`` is not a public unicast address ("loopback", "private" ...), else None."""
    addr = _embedded_ipv4(addr) or addr
    if addr.is_unspecified:
        return "unspecified"
    if addr.is_loopback:
        return "loopback"
    if addr.is_link_local:
        return "link-local"
    if addr.is_multicast:
        return "multicast"
    if addr.is_private:
        return "private"
    if addr.is_reserved:
        return "reserved"
    if addr.version == 6 and addr.is_site_local:  # fec0::/10: deprecated, still routed on some networks
        return "site-local"
    if not addr.is_global:
        return "non-public"
    return None


class AddressGuard:
    """Decides whether a connection to (host name, address) is allowed.

    ``allow`` holds the operator's exceptions: host names (exact, case-insensitive) whose addresses
    are all allowed, and addresses or CIDR ranges.
    """

    def __init__(self, allow: Iterable[str] = ()) -> None:
        self._names: set[str] = set()
        self._networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in allow:
            entry = entry.strip()
            try:
                self._networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self._names.add(entry.lower().rstrip("."))

    def refusal(self, host: str, ip: str, verb: str = "resolves to") -> str | None:
        """None when allowed, else the reason the address is refused ("<verb> a private address ...")."""
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return f"{verb} something that is not an address ({ip!r})"
        kind = non_public_kind(addr)
        if kind is None or host.lower().rstrip(".") in self._names:
            return None
        embedded = _embedded_ipv4(addr)
        if any(a in net for a in (addr, embedded) if a is not None for net in self._networks):
            return None
        return f"{verb} a {kind} address ({embedded or addr}), which is not allowed"


# One request ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # ASCII (IDNA) form, no brackets
    port: int
    path: str  # path and query, percent-encoded
    authorization: str | None


def _parse(url: str) -> _Target:
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise FetchError("is not a valid URL (it contains spaces or control characters)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise FetchError("is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchError("must be an http or https URL")
    host = parts.hostname or ""
    if not host:
        raise FetchError("has no host name")
    try:
        host = host if host.isascii() else host.encode("idna").decode("ascii")
    except UnicodeError:
        raise FetchError("has an invalid host name") from None
    path = quote(parts.path or "/", safe=_SAFE_IN_PATH)
    if parts.query:
        path += "?" + quote(parts.query, safe=_SAFE_IN_PATH)
    authorization = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")
    return _Target(scheme, host, port or (443 if scheme == "https" else 80), path, authorization)


class _Overtime(Exception):
    """The total deadline passed."""


class _Stalled(Exception):
    """No data arrived for one read timeout."""


class _DeadlineReader(io.RawIOBase):
    """Raw reads from a socket, each bounded by the read timeout and by what is left of the deadline."""

    def __init__(self, owner: _DeadlineSocket) -> None:
        self._owner = owner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._owner.recv_into(buffer)


class _DeadlineSocket:
    """The slice of the socket interface http.client uses, with the total deadline on every call."""

    def __init__(self, sock: socket.socket, deadline: float, read_timeout: float,
                 clock: Callable[[], float]) -> None:
        self._sock = sock
        self._deadline = deadline
        self._read_timeout = read_timeout
        self._clock = clock

    def _arm(self) -> bool:
        """Set the socket timeout for the next operation; True when the deadline is the bound."""
        remaining = self._deadline - self._clock()
        if remaining <= 0:
            raise _Overtime()
        self._sock.settimeout(min(self._read_timeout, remaining))
        return remaining <= self._read_timeout

    def recv_into(self, buffer: Any) -> int:
        deadline_bound = self._arm()
        try:
            return self._sock.recv_into(buffer)
        except TimeoutError:
            raise (_Overtime() if deadline_bound else _Stalled()) from None

    def sendall(self, data: bytes) -> None:
        deadline_bound = self._arm()
        try:
            self._sock.sendall(data)
        except TimeoutError:
            raise (_Overtime() if deadline_bound else _Stalled()) from None

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self))

    def close(self) -> None:
        # http.client closes the connection as soon as it has the headers of a response that ends at
        # end-of-stream, and keeps reading from the file made by makefile(); fetch() closes for real.
        pass

    def release(self) -> None:
        self._sock.close()


def _connect(target: _Target, addresses: list[str], policy: FetchPolicy, guard: AddressGuard,
             deadline: float, clock: Callable[[], float], verb: str) -> socket.socket:
    last_error: OSError | None = None
    for ip in addresses:
        remaining = deadline - clock()
        if remaining <= 0:
            raise _Overtime()
        try:
            sock = socket.create_connection((ip, target.port), timeout=min(policy.connect_timeout, remaining))
        except OSError as exc:
            last_error = exc
            continue
        # Belt and braces: check the peer the kernel actually connected us to.
        peer = str(sock.getpeername()[0])
        refusal = guard.refusal(target.host, peer, verb)
        if refusal:
            sock.close()
            raise FetchError(refusal)
        return sock
    if isinstance(last_error, TimeoutError):
        raise FetchError(f"could not be fetched: connection timed out after {policy.connect_timeout:g} seconds")
    if isinstance(last_error, ConnectionRefusedError):
        raise FetchError("could not be fetched: connection refused")
    reason = (last_error.strerror if last_error and last_error.strerror else str(last_error)).lower()
    raise FetchError(f"could not be fetched: {reason}")


def _open(target: _Target, policy: FetchPolicy, guard: AddressGuard, resolver: Resolver,
          deadline: float, clock: Callable[[], float], opened: list[_DeadlineSocket],
          verb: str) -> http.client.HTTPResponse:
    try:
        ipaddress.ip_address(target.host)
        addresses = [target.host]
    except ValueError:
        try:
            # A name server that never answers must not hold the request past the total deadline.
            with gevent.Timeout(max(0.001, deadline - clock()), _Overtime):
                addresses = list(resolver(target.host, target.port))
        except (OSError, UnicodeError):
            addresses = []
        if not addresses:
            raise FetchError(f"could not be fetched: the host name {target.host} does not resolve") from None
    for ip in addresses:
        refusal = guard.refusal(target.host, ip, verb)
        if refusal:
            raise FetchError(refusal)
    sock = _connect(target, addresses, policy, guard, deadline, clock, verb)
    conn: http.client.HTTPConnection
    try:
        if target.scheme == "https":
            context = ssl.create_default_context()
            sock.settimeout(max(0.001, min(policy.connect_timeout, deadline - clock())))
            sock = context.wrap_socket(sock, server_hostname=target.host)
            conn = http.client.HTTPSConnection(target.host, target.port, context=context)
        else:
            conn = http.client.HTTPConnection(target.host, target.port)
    except BaseException:
        sock.close()
        raise
    wrapped = _DeadlineSocket(sock, deadline, policy.read_timeout, clock)
    opened.append(wrapped)
    # http.client sends through conn.sock when it is set and never calls connect() itself.
    conn.sock = cast(Any, wrapped)
    conn.putrequest("GET", target.path, skip_accept_encoding=True)
    conn.putheader("User-Agent", policy.user_agent)
    conn.putheader("Accept", "audio/*, */*;q=0.5")
    conn.putheader("Accept-Encoding", "identity")
    conn.putheader("Connection", "close")
    if target.authorization:
        conn.putheader("Authorization", target.authorization)
    conn.endheaders()
    return conn.getresponse()


def _size(limit: int) -> str:
    return f"{limit / (1024 * 1024):g} MB" if limit >= 1024 * 1024 else f"{limit} bytes"


def _copy_body(response: http.client.HTTPResponse, max_bytes: int, into: BinaryIO) -> int:
    declared = response.getheader("Content-Length")
    if declared is not None and declared.strip().isdecimal() and int(declared) > max_bytes:
        raise FetchError(f"is larger than {_size(max_bytes)}")
    total = 0
    while True:
        chunk = response.read(CHUNK)
        if not chunk:
            return total
        total += len(chunk)
        if total > max_bytes:
            raise FetchError(f"is larger than {_size(max_bytes)}")
        into.write(chunk)


def fetch(url: str, policy: FetchPolicy, into: BinaryIO, *, resolver: Resolver | None = None,
          clock: Callable[[], float] = time.monotonic) -> int:
    """Write the body of ``url`` (after at most ``policy.max_redirects`` redirects) to ``into``; its size.

    FetchError otherwise; ``into`` may then hold part of a body.
    """
    guard = AddressGuard(policy.allow_private)
    resolve = resolver or default_resolver
    deadline = clock() + policy.total_timeout
    seen = {urlsplit(url)._replace(fragment="").geturl()}
    current = url
    redirects = 0
    while True:
        try:
            target = _parse(current)
        except FetchError as exc:
            if not redirects:
                raise
            raise FetchError(f"could not be fetched: it redirects to an unusable URL ({exc})") from None
        # The user gave one URL; a refused hop further on is described as where the URL leads.
        verb = "redirects to" if redirects else "resolves to"
        opened: list[_DeadlineSocket] = []
        try:
            response = _open(target, policy, guard, resolve, deadline, clock, opened, verb)
            if response.status in REDIRECT_STATUSES:
                location = (response.getheader("Location") or "").strip()
                if not location:
                    raise FetchError(f"could not be fetched: the server answered {response.status} "
                                     "without saying where to")
                current = urljoin(current, location)
                key = urlsplit(current)._replace(fragment="").geturl()
                if key in seen:
                    raise FetchError("could not be fetched: it redirects in a loop")
                seen.add(key)
                redirects += 1
                if redirects > policy.max_redirects:
                    raise FetchError(f"could not be fetched: more than {policy.max_redirects} redirects")
                continue
            if response.status != 200:
                raise FetchError(f"could not be fetched: the server answered {response.status} "
                                 f"{response.reason}".rstrip())
            return _copy_body(response, policy.max_bytes, into)
        except _Overtime:
            raise FetchError(f"could not be fetched: it took longer than {policy.total_timeout:g} seconds"
                             ) from None
        except _Stalled:
            raise FetchError(f"could not be fetched: the server sent nothing for {policy.read_timeout:g} "
                             "seconds") from None
        except ssl.SSLCertVerificationError as exc:
            raise FetchError(f"could not be fetched: its TLS certificate is not valid ({exc.verify_message})"
                             ) from None
        except ssl.SSLError as exc:
            raise FetchError(f"could not be fetched: TLS failed ({exc.reason or exc})") from None
        except http.client.IncompleteRead:
            raise FetchError("could not be fetched: the connection closed before the whole file arrived"
                             ) from None
        except http.client.HTTPException:
            raise FetchError("could not be fetched: the server's answer is not valid HTTP") from None
        except TimeoutError:
            raise FetchError(f"could not be fetched: connection timed out after {policy.connect_timeout:g} "
                             "seconds") from None
        except ConnectionResetError:
            raise FetchError("could not be fetched: the connection was reset") from None
        except OSError as exc:
            raise FetchError(f"could not be fetched: {(exc.strerror or str(exc)).lower()}") from None
        finally:
            for sock in opened:
                sock.release()
