"""The Quart application of one node: routes, error shape, start-up and shutdown."""

from __future__ import annotations

import asyncio
import logging
import time
from importlib import resources
from pathlib import Path
from typing import Any

from quart import Quart, Response, g, request, send_from_directory
from quart_schema import QuartSchema, hide
from redis.exceptions import RedisError
from werkzeug.exceptions import NotFound

from node.config import Settings
from node.runtime.cluster import Cluster
from node.runtime.happenings import ReminderLoop
from node.runtime.live import Live
from node.runtime.metrics import CONTENT_TYPE, NodeMetrics
from node.state.connect import load_scripts, open_redis, redis_client
from node.state.ratelimit import LoginLimiter, SignupLimiter
from node.state.revocation import TokenState
from node.store.db import open_store, ping_store
from node.store.text import mark_runs
from node.store.users import PasswordHasher
from node.web.api import api
from node.web.context import EXTENSION, NodeContext
from node.web.cors import MeshOrigins, allow_origin, preflight
from node.web.costs import costs_blueprint
from node.web.docs import docs_page
from node.web.errors import install_error_handlers
from node.web.files import install_files
from node.web.happenings import REMINDERS_EXTENSION, happenings_api
from node.web.headers import page_policy, secure
from node.web.peers import SocketSlots
from node.web.tokens import TokenService
from node.web.ws import ws_blueprint

log = logging.getLogger(__name__)
access_log = logging.getLogger("sfumesh.access")

#: the web client, found as package data (an installed wheel has no checkout around it);
#: installed wheels are unpacked on disk, so the resource is a real directory
WEBAPP_DIR = Path(str(resources.files("webapp")))
READY_TIMEOUT_S = 2.0


async def _render_metrics(app: Quart) -> Response:
    context: NodeContext | None = app.extensions.get(EXTENSION)
    if context is not None:
        await context.metrics.refresh()
    body = context.metrics.render() if context is not None else b""
    return Response(body, content_type=CONTENT_TYPE)


def create_metrics_app(node_app: Quart) -> Quart:
    """`/metrics` of `node_app` alone, for a listener of its own (`metrics.listen`): a
    scraper on a private address, nothing of it on the public one."""
    app = Quart(f"{__name__}.metrics", static_folder=None)
    install_error_handlers(app)

    @app.get("/metrics")
    async def metrics_text() -> Response:
        return await _render_metrics(node_app)

    return app


def create_app(settings: Settings) -> Quart:
    """The node's app. Redis and the store must already be reachable at the settings' URLs."""
    # Checked now, not at the first request: a node without signing keys must not start.
    tokens = TokenService(settings.tokens)
    app = Quart(__name__, static_folder=None)
    # "//" must not be merged by a redirect: "/api/rooms/a%2F/x" would reach another room.
    app.url_map.merge_slashes = False
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["JSON_SORT_KEYS"] = False
    schema = QuartSchema(
        app,
        info={"title": "sfumesh node API", "version": "0.1.0"},
        security_schemes={"bearer": {"type": "http", "scheme": "bearer"}},
        # Its UIs load scripts from CDNs; /docs is served below, from the node alone.
        swagger_ui_path=None,
        redoc_ui_path=None,
        scalar_ui_path=None,
    )
    install_error_handlers(app)
    app.register_blueprint(api)
    app.register_blueprint(happenings_api)
    app.register_blueprint(ws_blueprint)
    app.register_blueprint(costs_blueprint)

    @app.before_serving
    async def _open() -> None:
        # Built from the Unicode tables once (~40 ms): now, not in the first request's time.
        mark_runs()
        started = time.perf_counter()
        phases: dict[str, float] = {}
        redis = open_redis(settings)
        # The store's set-up (Beanie, indexes) needs nothing of Redis or Serf, nor they of it:
        # side by side, a node far from both pays the longer of the two, not their sum
        # (README "WAN lab": 20.6 s to ready at 300 ms RTT when one followed the other).
        opening = asyncio.create_task(
            open_store(settings.mongodb_uri.get_secret_value(), settings.database),
            name="open-store",
        )
        opening.add_done_callback(
            lambda _: phases.__setitem__("store_s", time.perf_counter() - started)
        )
        hasher = PasswordHasher(
            settings.bcrypt_cost, settings.hashing.threads, settings.hashing.max_waiting
        )
        # bcrypt's first hash (its thread pool, ~0.3 s of CPU) also runs beside the rest.
        warming = asyncio.create_task(hasher.warm_up(), name="warm-hasher")
        try:
            lock_clients = [
                redis_client(url.get_secret_value()) for url in settings.live.lock_redis_urls
            ]
            live = Live(settings, redis, [*lock_clients])
            await live.start()
            phases["redis_s"] = time.perf_counter() - started
            metrics = NodeMetrics(settings.node_name, settings.region)
            metrics.watch(
                lambda: len(live.hub.connections),
                lambda: len(live.hub.rooms),
                lambda: live.redis_ok,
            )
            metrics.watch_media(live.media, settings.metrics.per_session)
            live.metrics = metrics
            cluster = Cluster(settings, live)
            await cluster.start()
            phases["serf_s"] = time.perf_counter() - started
            if cluster.relay is not None:
                metrics.watch_relays(cluster.relay)
            # Built before the scripts are loaded: they register theirs.
            login_limiter = LoginLimiter(redis, settings.login_limit)
            signup_limiter = SignupLimiter(redis, settings.signup_limit)
            reminders = ReminderLoop(live)
            await asyncio.gather(*(load_scripts(c) for c in [redis, *lock_clients]))
            phases["scripts_s"] = time.perf_counter() - started
            await warming
            store = await opening
        finally:
            # no-ops once they are done; else start-up failed: stop them
            warming.cancel()
            opening.cancel()
        app.extensions[EXTENSION] = NodeContext(
            settings=settings,
            redis=redis,
            store=store,
            tokens=tokens,
            token_state=TokenState(redis),
            hasher=hasher,
            login_limiter=login_limiter,
            signup_limiter=signup_limiter,
            live=live,
            metrics=metrics,
            cluster=cluster,
            ws_slots=SocketSlots(settings.live.ws_max_per_user, settings.live.ws_max_per_address),
        )
        reminders.start()
        app.extensions[REMINDERS_EXTENSION] = reminders
        # When each part of the start-up was done (s since it began; the store's runs beside
        # the others): what a node far from Redis and the store waits for.
        startup = {name: round(seconds, 3) for name, seconds in phases.items()}
        log.info(
            "node.ready",
            extra={"node": settings.node_name, "region": settings.region, "startup": startup},
        )

    @app.after_serving
    async def _close() -> None:
        reminders: ReminderLoop | None = app.extensions.pop(REMINDERS_EXTENSION, None)
        if reminders is not None:
            await reminders.stop()
        context: NodeContext | None = app.extensions.pop(EXTENSION, None)
        if context is not None:
            await context.live.drain()
            if context.cluster.relay is not None:
                await context.cluster.relay.stop()  # before the media it forwards goes
            await context.live.stop()
            await context.cluster.stop(leave=True)
            for lock_client in context.live.lock_redis:
                await lock_client.aclose()
            await context.redis.aclose()
            await context.store.close()
            context.hasher.close()
        log.info("node.stopped", extra={"node": settings.node_name})

    @app.after_request
    async def _security_headers(response: Response) -> Response:
        return secure(response)

    @app.before_request
    async def _start_timer() -> None:
        g.started = time.perf_counter()

    @app.after_request
    async def _access_log(response: Response) -> Response:
        started = getattr(g, "started", None)
        elapsed = (time.perf_counter() - started) * 1000 if started else None
        # The path only, never the query string: tokens may travel there (WebSocket).
        context: NodeContext | None = app.extensions.get(EXTENSION)
        if context is not None:
            route = request.url_rule.rule if request.url_rule is not None else "unmatched"
            context.metrics.http_requests.labels(
                request.method, route, str(response.status_code)
            ).inc()
            if elapsed is not None:
                context.metrics.http_seconds.labels(route).observe(elapsed / 1000)
        access_log.info(
            "http.request",
            extra={
                "method": request.method,
                "path": request.path,
                "status": response.status_code,
                "ms": round(elapsed, 2) if elapsed is not None else None,
            },
        )
        return response

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "node": settings.node_name}

    @app.get("/readyz")
    async def readyz() -> tuple[dict[str, Any], int]:
        context: NodeContext | None = app.extensions.get(EXTENSION)
        checks: dict[str, str] = {}
        if context is None:
            return {"status": "starting", "checks": checks}, 503
        probes = {"redis": context.redis.ping(), "store": ping_store(context.store)}
        for name, probe in probes.items():
            try:
                await asyncio.wait_for(probe, READY_TIMEOUT_S)
                checks[name] = "ok"
            except Exception as error:
                checks[name] = f"unreachable: {type(error).__name__}"
        if context.cluster.enabled:
            checks["serf"] = context.cluster.ready()
        if context.live.draining:
            checks["node"] = "draining"
        elif checks.get("redis") == "ok" and not (
            context.live.redis_ok and await context.live.registry.is_registered()
        ):
            checks["node"] = "not registered in Redis (yet)"
        ready = all(value == "ok" for value in checks.values())
        return {
            "status": "ready" if ready else "not_ready",
            "checks": checks,
        }, 200 if ready else 503

    @app.get("/metrics")
    async def metrics_text() -> Response:
        if settings.metrics.listen:
            raise NotFound()  # served on the metrics listener only
        return await _render_metrics(app)

    @app.get("/static/<path:filename>")
    async def webapp_static(filename: str) -> Response:
        # send_from_directory refuses paths leaving WEBAPP_DIR and missing files with a
        # NotFound, which the error handlers turn into the contract's 404.
        # The type is fixed: Python 3.11 alone guesses application/javascript for .js.
        if filename.endswith("/"):
            raise NotFound()  # not a directory listing, nor the file under a second name
        script = filename.endswith((".js", ".mjs"))
        return await send_from_directory(
            WEBAPP_DIR, filename, mimetype="text/javascript" if script else None
        )

    @app.get("/")
    @app.get("/r/<path:slug>")
    async def webapp(slug: str | None = None) -> Response:
        response = await send_from_directory(WEBAPP_DIR, "index.html")
        response.headers["Content-Security-Policy"] = page_policy(await _mesh_urls())
        return response

    async def _mesh_urls() -> list[str]:
        """This node's URL and every live node's: where the page may ping and connect."""
        urls = [settings.base_url]
        context: NodeContext | None = app.extensions.get(EXTENSION)
        if context is not None:
            try:
                urls += [info.url for info in await context.live.registry.live()]
            except (RedisError, OSError) as error:
                # The page still works on this node alone (closest.js falls back to it).
                log.warning("webapp.nodes_unknown", extra={"error": str(error)})
        return urls

    async def _origin_urls() -> list[str]:
        """Where pages calling this API may come from: the live nodes, and every node
        registered within `live.node_url_memory_s` (a dead or drained node's pages carry on
        through the others)."""
        urls = await _mesh_urls()
        context: NodeContext | None = app.extensions.get(EXTENSION)
        if context is not None:
            try:
                urls += await context.live.registry.recent_urls()
            except (RedisError, OSError) as error:
                log.warning("webapp.nodes_unknown", extra={"error": str(error)})
        return urls

    # The API answers pages of every node of the mesh (a page whose node died carries on
    # through another node): node/web/cors.py.
    mesh_origins = MeshOrigins(_origin_urls)

    @app.before_request
    async def _cors_preflight() -> Response | None:
        return await preflight(mesh_origins)

    @app.after_request
    async def _cors(response: Response) -> Response:
        return await allow_origin(mesh_origins, response)

    docs: list[str] = []

    @app.get("/docs")
    @hide
    async def api_docs() -> Response:
        if not docs:  # the routes are all known by the first request
            docs.append(docs_page(schema.openapi_provider.schema()))
        return Response(docs[0], content_type="text/html; charset=utf-8")

    # Last: its start-up needs the node context `_open` makes, and its request class wraps
    # the error handlers' one.
    install_files(app)
    return app
