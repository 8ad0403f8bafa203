"""The same app on Ray Serve, as two deployments:

- `Replica` (`--replicas N`): each builds `create_app(settings)` and runs its lifespan, so each loads the
  pipeline once and batches its own requests. It answers whole HTTP requests handed to it by the front
  (`replay`), and ends each answer with the sessions it keeps.
- `Front` (one replica, no CPU reserved): the ingress behind Ray's HTTP proxy. It reads a request's body,
  computes its session key and hands the request to a replica through the session-affinity router
  (routing.py); the replica's response goes back to the client as it comes.

Needs the `[ray]` extra; imported only by `serve --ray`.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from dataclasses import dataclass

from .app import create_app, error_response
from .errors import APIError
from .settings import ServerSettings

APP, MODEL, FRONT = "qwen2vl-edge", "qwen2vl-edge", "qwen2vl-edge-front"
SESSIONS_MESSAGE = "qwen2vl.sessions"  # the last item of a replica's answer: the sessions it keeps now
FORWARDED = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "root_path", "query_string",
             "headers", "client", "server")  # the ASGI scope's plain-data keys: what a replica needs
ATTEMPTS = 3  # a request whose replica died before answering is handed to another, up to this many times in all
REPLICA_DIED = APIError(503, "the replica serving this request stopped (its process died): retry",
                        code="replica_died")
SHUTDOWN = {"graceful_shutdown_wait_loop_s": 0.1,  # Ray checks for requests still running this often
            "graceful_shutdown_timeout_s": 5.0}  # then ends them: the replicas answered them 503 already (drain)
DRAIN_TIMEOUT_S = 5.0


async def replay(app, scope: dict, body: bytes):
    """Run the ASGI `app` on one HTTP request whose whole body is `body` -> the messages it sends. Closing
    the generator before the end (the client left) tells the app that the client disconnected."""
    messages: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    unread = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if unread:
            return unread.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    task = asyncio.ensure_future(app(scope, receive, messages.put))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        while (message := await messages.get()) is not None:
            yield message
        task.result()  # the app's own failure, if any
    finally:
        gone.set()
        task.cancel()  # no-op once the app has returned


async def read_body(receive, limit: int) -> bytes:
    """The request's body, read up to just over `limit` bytes: the replica answers a longer one 413."""
    body = bytearray()
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body") or len(body) > limit:
            return bytes(body)


def _sse_error(e: APIError) -> bytes:
    return f"data: {json.dumps(e.body())}\n\ndata: [DONE]\n\n".encode()


@dataclass
class Progress:
    started: bool = False  # the response's status and headers went out
    sse: bool = False  # ... as an event stream


class Forwarder:
    """The front's ASGI app: each HTTP request goes, body and all, to the replica the session router picks,
    and its messages come back unchanged. A replica that dies before the response starts is replaced by
    another for the request; one that dies after it started ends it with a 503 error (an SSE error event
    and `[DONE]` in an event stream)."""

    def __init__(self, model, settings: ServerSettings):
        self.model, self.settings = model.options(stream=True), settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan: nothing to start or stop here
            return
        from ray.exceptions import RayActorError

        from .routing import SESSION_ARG, session_key

        body = await read_body(receive, self.settings.limits.max_body_bytes)
        key = await asyncio.to_thread(session_key, scope, body, self.settings)
        request, progress = {k: scope[k] for k in FORWARDED if k in scope}, Progress()
        for _ in range(ATTEMPTS):
            try:
                return await self._relay(self.model.http.remote(request, body, **{SESSION_ARG: key}), send, progress)
            except RayActorError:
                if progress.started:
                    break
        await self._died(scope, receive, send, progress)

    @staticmethod
    async def _relay(response, send, progress: Progress) -> None:
        from .routing import SESSIONS

        try:
            async for message in response:
                if message["type"] == SESSIONS_MESSAGE:
                    SESSIONS.report(message["replica"], message["keys"])
                    continue
                if message["type"] == "http.response.start":
                    progress.started = True
                    progress.sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                       for k, v in message["headers"])
                await send(message)
        except asyncio.CancelledError:  # the client left: so does the replica's request
            response.cancel()
            raise

    @staticmethod
    async def _died(scope, receive, send, progress: Progress) -> None:
        if progress.sse:
            await send({"type": "http.response.body", "body": _sse_error(REPLICA_DIED), "more_body": False})
        elif progress.started:  # a JSON answer cut short: nothing sensible can follow
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            await error_response(REPLICA_DIED)(scope, receive, send)


def deployment(settings: ServerSettings, replicas: int, cpus_per_replica: float, gpus_per_replica: float = 0.0):
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from .routing import SessionAffinityRouter

    capacity = settings.limits.max_queue + settings.max_batch  # what one replica's batcher holds

    @serve.deployment(name=MODEL, num_replicas=replicas,
                      ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
                      max_ongoing_requests=capacity, **SHUTDOWN,
                      request_router_config=RequestRouterConfig(request_router_class=SessionAffinityRouter))
    class Replica:
        async def __init__(self, settings: ServerSettings):  # ready once the app's lifespan loaded the pipeline
            self.app = create_app(settings)
            self.lifespan = self.app.router.lifespan_context(self.app)
            await self.lifespan.__aenter__()

        async def __del__(self):  # Ray Serve awaits it when the replica stops
            await self.lifespan.__aexit__(None, None, None)

        async def http(self, scope: dict, body: bytes, session: str | None = None):
            """One HTTP request's ASGI messages, then the sessions this replica keeps (`session` is for the
            router)."""
            async for message in replay(self.app, scope, body):
                yield message
            yield {"type": SESSIONS_MESSAGE, "replica": serve.get_replica_context().replica_id.unique_id,
                   "keys": sorted(self.app.state.batcher.sessions.keys)}

        def drain(self) -> None:
            """Refuse new requests and answer the ones held 503 at their next token (shutdown)."""
            self.app.state.batcher.stop()

    @serve.deployment(name=FRONT, num_replicas=1, ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=capacity * replicas, **SHUTDOWN)
    @serve.ingress()
    class Front:
        def __init__(self, model, settings: ServerSettings):
            self.model, self.settings = model, settings

        def __serve_build_asgi_app__(self):
            return Forwarder(self.model, self.settings)

    return Front.bind(Replica.bind(settings), settings)


def start(settings: ServerSettings, replicas: int, host: str, port: int, cpus_per_replica: float = 1.0,
          gpus_per_replica: float = 0.0) -> None:
    """Serve's HTTP proxy on host:port with the replicas, on the Ray that `init_ray` started or joined;
    returns once every replica is ready."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    serve.run(deployment(settings, replicas, cpus_per_replica, gpus_per_replica), name=APP, route_prefix="/")


def init_ray(address: str | None) -> None:
    """Join the cluster at `address`, or start a local one on the loopback interface: a one-machine
    cluster needs no other, and its GCS, raylet and workers then listen on nothing but 127.0.0.1."""
    import ray

    if address:
        ray.init(address=address, include_dashboard=False)
    else:
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")


def drain() -> None:
    """Every replica answers what it holds 503 at the next token, as the single process does on SIGTERM."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        serve.get_deployment_handle(MODEL, APP).broadcast("drain").results(timeout_s=DRAIN_TIMEOUT_S,
                                                                            return_exceptions=True)
    except (KeyError, RayServeException, TimeoutError) as e:  # not deployed (a stop while starting), or stuck
        print(f"stopping: the replicas were not drained ({type(e).__name__}: {e})", file=sys.stderr, flush=True)


def stop(joined: bool) -> None:
    """Drain, then take the app down; the Ray cluster this process started goes with it, a cluster it
    joined stays up (with Serve, for its other apps)."""
    import ray
    from ray import serve

    drain()
    if joined:
        serve.delete(APP)
    else:
        serve.shutdown()
    ray.shutdown()


RAY_START_FAILED = 3  # exit status of `serve --ray` when Ray itself cannot start on this machine


def run_forever(settings: ServerSettings, replicas: int, host: str, port: int, address: str | None,
                cpus_per_replica: float, gpus_per_replica: float = 0.0) -> None:
    from qwen2vl_edge.runtime.artifact import load_artifact

    load_artifact(settings.artifact, verify=False, backend=settings.backend)  # fails here, not in every replica
    try:
        init_ray(address)
    except Exception as e:  # Ray's own start-up (raylet, GCS, ports): reported as such, with its message
        print(f"error: Ray could not start: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(RAY_START_FAILED) from None
    # ray.init installs a SIGTERM handler that exits at once (status 15) without stopping Serve; ours
    # goes in before the replicas start, so that a stop while they start shuts them down too
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    try:
        start(settings, replicas, host, port, cpus_per_replica, gpus_per_replica)
        print(f"serving {settings.served_name} on http://{host}:{port}/v1 with {replicas} Ray Serve replicas",
              flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut the stop short
            signal.signal(sig, signal.SIG_IGN)
        stop(joined=bool(address))
