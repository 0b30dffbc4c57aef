"""Run one node: backing services (given or embedded), the app under Hypercorn, clean exit."""

from __future__ import annotations

import asyncio
import logging
import signal

from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig
from pydantic import SecretStr

from mesh.process import ManagedProcess, private_dir
from node.config import Settings
from node.runtime.gc_pauses import freeze_after_start
from node.runtime.services import BackingServices
from node.web.app import create_app, create_metrics_app
from node.web.context import EXTENSION, NodeContext

log = logging.getLogger(__name__)

EXIT_SERVICE_DIED = 3
GRACEFUL_TIMEOUT_S = 10.0
# How long an idle HTTP/1.1 connection is kept. Hypercorn's default, 5 s, is exactly the
# idle time after which httpx (and others) stop reusing a pooled connection: a request sent
# on one just as the server closed it failed with "Server disconnected without sending a
# response" (seen in the lab under load). Longer than the clients' own expiry, as nginx's
# 75 s is, the server never closes first on a client that follows its own expiry.
KEEP_ALIVE_S = 75.0


def hypercorn_config(settings: Settings, bind: str | None = None) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [bind or f"{settings.host}:{settings.port}"]
    config.graceful_timeout = GRACEFUL_TIMEOUT_S
    config.keep_alive_timeout = KEEP_ALIVE_S
    config.accesslog = None  # the app logs each request itself, structured
    config.errorlog = logging.getLogger("hypercorn.error")
    # Hypercorn buffers a WebSocket message whole before the app sees it (16 MiB by
    # default): with the app's own limit here, a longer message is cut off as it arrives
    # and the socket closed (1009, message too big). Hypercorn counts a text message in
    # characters, so it holds at most this many characters (4 bytes each at worst) of it.
    # The limit is the largest frame a client may send at all: an answer to a large
    # subscribe offer (live.ws_max_answer_bytes); the app holds every other frame to
    # ws_max_frame_bytes itself.
    config.websocket_max_message_size = settings.live.max_incoming_frame_bytes
    return config


async def _freeze_after_start() -> None:
    freeze_after_start()


async def run_node(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT (exit 0) or until an embedded service dies (exit 3)."""
    private_dir(settings.data_dir, tighten=False)
    services = await asyncio.to_thread(
        BackingServices.start,
        # Sentinel mode names no URL (the sentinels name the primary), yet must not start
        # an embedded redis-server: a placeholder stands for the URL it does not use.
        settings.redis_url.get_secret_value()
        or ("sentinel:" if settings.redis.mode == "sentinel" else ""),
        settings.mongodb_uri.get_secret_value(),
        settings.data_dir / "services",
    )
    exit_code = 0
    try:
        settings = settings.model_copy(
            update={
                "redis_url": SecretStr(services.redis_url),
                "mongodb_uri": SecretStr(services.mongodb_uri),
            }
        )
        app = create_app(settings)
        # after the app's own start-up (registered later, run later): its state, and every
        # library's, out of the cyclic collector's walks (node.runtime.gc_pauses)
        if settings.gc_freeze:
            app.before_serving(_freeze_after_start)
        stop = asyncio.Event()
        draining: list[asyncio.Task[None]] = []

        async def drain_then_stop() -> None:
            # Before Hypercorn's graceful wait: open WebSockets would hold it for its whole
            # timeout, and clients must hear `reconnect` while this node still answers.
            context: NodeContext | None = app.extensions.get(EXTENSION)
            if context is not None:
                try:
                    await context.live.drain()
                except Exception:
                    log.exception("node.drain_failed")
            stop.set()

        def on_signal() -> None:
            if not draining:
                draining.append(asyncio.create_task(drain_then_stop()))

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal)

        async def on_death(child: ManagedProcess) -> None:
            nonlocal exit_code
            exit_code = EXIT_SERVICE_DIED
            stop.set()

        watcher = asyncio.create_task(services.watch(on_death))
        log.info(
            "node.listening",
            extra={"node": settings.node_name, "url": settings.base_url, "region": settings.region},
        )
        servers = [serve(app, hypercorn_config(settings), shutdown_trigger=stop.wait)]
        if settings.metrics.listen:
            metrics_config = hypercorn_config(settings, settings.metrics.listen)
            servers.append(
                serve(create_metrics_app(app), metrics_config, shutdown_trigger=stop.wait)
            )
            log.info("node.metrics_listening", extra={"listen": settings.metrics.listen})
        tasks = [asyncio.ensure_future(server) for server in servers]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            # One listener failed (its address taken, say): the node stops, not half served.
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            watcher.cancel()
    finally:
        await asyncio.to_thread(services.stop)
    log.info("node.exit", extra={"node": settings.node_name, "code": exit_code})
    return exit_code
