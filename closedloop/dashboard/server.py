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
import secrets
import threading
from collections.abc import AsyncIterator
from http.cookies import SimpleCookie
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs

import anyio
from starlette.applications import Starlette
from starlette.responses import HTMLResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from closedloop.core.logs import logger
from closedloop.dashboard.state import ExperimentView

__all__ = ["ASSETS", "TOKEN_COOKIE", "is_loopback", "make_dashboard_app", "read_assets", "serve_dashboard"]

ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css", "uPlot.min.css": "text/css"}
TOKEN_COOKIE = "closedloop_dashboard_token"
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


def _token_of(scope: dict) -> tuple[str | None, bool]:
    """The token a request carries and whether it came in the query (the page's URL)."""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    if query.get("token"):
        return query["token"][0], True
    headers = dict(scope.get("headers", []))
    authorization = headers.get(b"authorization", b"").decode("latin-1")
    if authorization.startswith("Bearer "):
        return authorization[len("Bearer "):].strip(), False
    cookie = SimpleCookie()
    with contextlib.suppress(Exception):
        cookie.load(headers.get(b"cookie", b"").decode("latin-1"))
    morsel = cookie.get(TOKEN_COOKIE)
    return (morsel.value if morsel else None), False


class _Guard:
    """ASGI middleware: the ``Host`` check on loopback, the token elsewhere, the security headers."""

    def __init__(self, app, *, token: str | None, hosts: set[str] | None) -> None:
        self.app, self.token, self.hosts = app, token, hosts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if self.hosts is not None and host not in self.hosts:
            await PlainTextResponse(f"refused: Host {host!r} is not this dashboard's address", 421, headers=_HEADERS)(
                scope, receive, send)
            return
        from_query = False
        if self.token is not None:
            given, from_query = _token_of(scope)
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
                    headers.append((b"set-cookie", f"{TOKEN_COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict".encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def make_dashboard_app(view: ExperimentView, *, token: str | None = None, hosts: set[str] | None = None,
                       interval_s: float = 1.0, assets: dict[str, bytes] | None = None,
                       stop: threading.Event | None = None):
    """The dashboard as an ASGI app.

    ``view``: what it shows; ``token``: required on every request when given (bound beyond
    loopback); ``hosts``: the ``Host`` values accepted (bound to loopback), None for any;
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
    return _Guard(app, token=token, hosts=hosts)


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
    hosts = {f"{name}:{port}" for name in ("127.0.0.1", "localhost", "[::1]", shown)} if loopback else None
    stop = threading.Event()
    app = make_dashboard_app(ExperimentView(experiment, thresholds), token=token, hosts=hosts, interval_s=interval_s,
                             assets=assets, stop=stop)
    announce(f"dashboard of {Path(experiment).absolute()}: http://{shown}:{port}/" + (f"?token={token}" if token else ""))

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            stop.set()  # Ctrl-C: the open event streams end, so that their connections close
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
