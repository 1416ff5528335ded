"""The dashboard's web server: one page, its bundled assets, and the experiment's state pushed
by server-sent events (``closedloop dashboard``; docs/dashboard.md).

One reader (:class:`~closedloop.dashboard.state.ExperimentView`) takes a snapshot every
``interval_s`` in a worker thread and serialises it once; every open page receives that same text
on ``/events``, so ten browsers cost the day no more than one. Routes, all ``GET`` (anything else
is refused with 405; nothing writes):

| path | what |
| --- | --- |
| ``/`` | the page |
| ``/assets/<name>`` | the page's script and styles, from a fixed list built by ``make web`` (no path is ever joined) |
| ``/events`` | ``text/event-stream``: one ``data:`` line with the state JSON per snapshot |
| ``/api/state`` | the latest state as JSON (for scripts and ``curl``) |

Security: bound to a loopback address it answers only requests whose ``Host`` is that address
(no DNS rebinding); bound to any other address it requires, on every request, the token printed
at start: ``?token=`` (the page's URL; the answer sets a same-site, HTTP-only cookie that carries
it on later requests), the cookie, or ``Authorization: Bearer <token>``. Responses forbid framing,
sniffing, referrers and any script or style not served by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import re
import secrets
import threading
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs

import anyio
from starlette.applications import Starlette
from starlette.requests import cookie_parser
from starlette.responses import HTMLResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from closedloop.core.logs import logger
from closedloop.dashboard.state import ExperimentView

__all__ = ["ASSETS", "TOKEN_COOKIE", "is_loopback", "make_dashboard_app", "read_assets", "serve_dashboard"]

ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css", "uPlot.min.css": "text/css"}
TOKEN_COOKIE = "closedloop_dashboard_token"  # + "_<port>": two dashboards on one computer keep their own
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
_MAX_CONNECTIONS = 200  # beyond: 503 (a flood of connections must not take the file descriptors)
_KEEPALIVE_S = 15.0
_HEADERS = {
    "Content-Security-Policy":
        "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and the loopback addresses (127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_assets() -> dict[str, bytes]:
    """The page and its bundled assets (name → bytes); ``FileNotFoundError`` naming ``make web`` when
    the bundle was not built."""
    package = resources.files("closedloop.dashboard")
    found = {"page.html": package.joinpath("page.html").read_bytes()}
    for name in ASSETS:
        path = package.joinpath("_web", name)
        if not path.is_file():
            raise FileNotFoundError(
                f"the dashboard's bundle {name} is missing from {Path(str(package)) / '_web'}; build it with `make web` "
                "(npm and esbuild, from web/package-lock.json)"
            )
        found[name] = path.read_bytes()
    return found


class _Snapshots:
    """The latest state, serialised once, and a way for every open page to wait for the next one."""

    def __init__(self, view: ExperimentView, interval_s: float, stop: threading.Event) -> None:
        self.view, self.interval_s, self.stop = view, interval_s, stop
        self.text = "{}"
        self.version = 0
        self._changed = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                state = await anyio.to_thread.run_sync(self.view.snapshot)
                self.text = json.dumps(state, allow_nan=False, separators=(",", ":"))
            except Exception as error:  # noqa: BLE001 - the page shows the last state; the log says why
                logger.warning("dashboard: could not read the experiment: %s", error)
            else:
                self.version += 1
                self._changed.set()
                self._changed = asyncio.Event()
            await asyncio.sleep(self.interval_s)

    async def follow(self) -> AsyncIterator[str]:
        """Server-sent events: the latest state at once, then each new one; a comment line as a keep-alive.
        Ends when the server stops (the stream's connection can then close)."""
        seen = 0
        while not self.stop.is_set():
            if self.version != seen:
                seen = self.version
                yield f"data: {self.text}\n\n"
                continue
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), _KEEPALIVE_S)
                continue
            yield ": keep-alive\n\n"


def _token_of(scope: dict, cookie_name: str) -> tuple[str | None, bool]:
    """The token a request carries and whether it came in the query (the page's URL)."""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    if query.get("token"):
        return query["token"][0], True
    headers = dict(scope.get("headers", []))
    scheme, _, value = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip(), False
    # starlette's parser, as browsers do: a malformed cookie of another site on this host hides nothing
    return cookie_parser(headers.get(b"cookie", b"").decode("latin-1")).get(cookie_name), False


def _host_name(host: str) -> str:
    """The name of a ``Host`` header without its port: ``[::1]:8050`` → ``[::1]``, ``localhost`` →
    ``localhost``; anything else than NAME or NAME:PORT comes back whole (and is refused)."""
    found = re.fullmatch(r"(\[[0-9A-Fa-f:.]*\]|[^:\[\]]*)(?::\d{1,5})?", host)
    return found[1] if found else host


class _Guard:
    """ASGI middleware: the ``Host`` check on loopback, the token elsewhere, the security headers."""

    def __init__(self, app, *, token: str | None, hosts: set[str] | None, cookie_name: str) -> None:
        self.app, self.token, self.hosts, self.cookie_name = app, token, hosts, cookie_name

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if self.hosts is not None and _host_name(host).lower() not in self.hosts:
            await PlainTextResponse(f"refused: Host {host!r} is not this dashboard's address", 421, headers=_HEADERS)(
                scope, receive, send)
            return
        from_query = False
        if self.token is not None:
            given, from_query = _token_of(scope, self.cookie_name)
            if given is None or not secrets.compare_digest(given.encode(), self.token.encode()):
                await PlainTextResponse(
                    "refused: this dashboard needs its access token; open the URL that `closedloop dashboard` printed "
                    "(…/?token=…)", 401, headers=_HEADERS)(scope, receive, send)
                return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(k.lower().encode(), v.encode()) for k, v in _HEADERS.items()
                            if k.lower().encode() not in {name for name, _ in headers}]
                if from_query:
                    cookie = f"{self.cookie_name}={self.token}; Path=/; HttpOnly; SameSite=Strict"
                    headers.append((b"set-cookie", cookie.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def make_dashboard_app(view: ExperimentView, *, token: str | None = None, hosts: set[str] | None = None,
                       interval_s: float = 1.0, assets: dict[str, bytes] | None = None,
                       stop: threading.Event | None = None, cookie_name: str = TOKEN_COOKIE):
    """The dashboard as an ASGI app.

    ``view``: what it shows; ``token``: required on every request when given (bound beyond
    loopback), and carried by the cookie ``cookie_name`` once given in the URL; ``hosts``: the
    ``Host`` names accepted, any port (bound to loopback: its names), None for any;
    ``interval_s``: seconds between snapshots; ``assets``: from :func:`read_assets` (read by
    default); ``stop``: once set, the event streams end (within ``interval_s``).
    """
    assets = assets if assets is not None else read_assets()
    snapshots = _Snapshots(view, interval_s, stop or threading.Event())

    async def page(request) -> Response:
        return HTMLResponse(assets["page.html"])

    async def asset(request) -> Response:
        name = request.path_params["name"]
        if name not in ASSETS:
            return PlainTextResponse("not found", 404)
        return Response(assets[name], media_type=ASSETS[name])

    async def events(request) -> Response:
        return StreamingResponse(snapshots.follow(), media_type="text/event-stream",
                                 headers={"X-Accel-Buffering": "no"})

    async def state(request) -> Response:
        return Response(snapshots.text, media_type="application/json")

    @contextlib.asynccontextmanager
    async def lifespan(app) -> AsyncIterator[None]:
        task = asyncio.create_task(snapshots.run())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    routes = [Route("/", page, methods=["GET"]), Route("/assets/{name}", asset, methods=["GET"]),
              Route("/events", events, methods=["GET"]), Route("/api/state", state, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.router.redirect_slashes = False  # /events/ is not found, not redirected
    return _Guard(app, token=token, hosts=hosts, cookie_name=cookie_name)


def serve_dashboard(experiment: str | Path, thresholds, *, host: str, port: int, interval_s: float = 1.0,
                    announce=print) -> None:
    """Serve the dashboard of ``experiment`` on ``host``:``port`` until interrupted (Ctrl-C).

    ``thresholds``: the experiment's :class:`~closedloop.config.DashboardSection`; ``port`` 0 picks
    a free port. ``announce(text)`` is handed the URL to open (with the token when ``host`` is not
    loopback) once the socket is bound. Raises ``OSError`` naming the address when it cannot be bound.
    """
    import socket

    import uvicorn

    assets = read_assets()
    if host.startswith("[") != host.endswith("]"):
        raise OSError(f"cannot serve the dashboard on {host!r}: unbalanced brackets; give an IPv6 address as ::1 or [::1]")
    loopback = is_loopback(host)
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as error:
        sock.close()
        raise OSError(f"cannot serve the dashboard on {host}:{port}: {error.strerror or error}; choose another --port "
                      "(or stop what uses it), or another --host") from None
    sock.listen(64)
    port = sock.getsockname()[1]
    shown = f"[{host.strip('[]')}]" if family == socket.AF_INET6 else host
    token = None if loopback else secrets.token_urlsafe(24)
    stop = threading.Event()
    hosts = {*_LOOPBACK_NAMES, shown.lower()} if loopback else None  # any port: an SSH tunnel may forward another
    app = make_dashboard_app(ExperimentView(experiment, thresholds), token=token, hosts=hosts, interval_s=interval_s,
                             assets=assets, stop=stop, cookie_name=f"{TOKEN_COOKIE}_{port}")
    announce(f"dashboard of {Path(experiment).absolute()}: http://{shown}:{port}/" + (f"?token={token}" if token else ""))

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            stop.set()  # Ctrl-C: the open event streams end, so that their connections close
            super().handle_exit(sig, frame)

    _raise_open_files_limit()
    server = Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=5,
                                   limit_concurrency=_MAX_CONNECTIONS, timeout_keep_alive=5))
    server.run(sockets=[sock])


def _raise_open_files_limit() -> None:
    """Let the process open as many files as the system allows (a soft limit of 1024 is a few
    hundred idle connections away); a host that refuses keeps its limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
