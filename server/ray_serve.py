"""The same app on Ray Serve: each replica is a Ray actor that builds `create_app(settings)` and runs its
lifespan, so each loads the pipeline once and batches its own requests. Ray's HTTP proxy spreads requests
over the replicas. Needs the `[ray]` extra; imported only by `serve --ray`.
"""

from __future__ import annotations

import signal
import sys
import time

from .app import create_app
from .settings import ServerSettings


def deployment(settings: ServerSettings, replicas: int, cpus_per_replica: float):
    from ray import serve

    @serve.deployment(name="qwen2vl-edge", num_replicas=replicas,
                      ray_actor_options={"num_cpus": cpus_per_replica},
                      max_ongoing_requests=settings.limits.max_queue + settings.max_batch)
    @serve.ingress()
    class Replica:
        def __init__(self, settings: ServerSettings):
            self.settings = settings

        def __serve_build_asgi_app__(self):  # Ray Serve calls this in the replica, after __init__
            return create_app(self.settings)

    return Replica.bind(settings)


def start(settings: ServerSettings, replicas: int, host: str, port: int, cpus_per_replica: float = 1.0) -> None:
    """Serve's HTTP proxy on host:port with the replicas, on the Ray that `init_ray` started or joined;
    returns once every replica is ready."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    serve.run(deployment(settings, replicas, cpus_per_replica), name="qwen2vl-edge", route_prefix="/")


def init_ray(address: str | None) -> None:
    """Join the cluster at `address`, or start a local one on the loopback interface: a one-machine
    cluster needs no other, and its GCS, raylet and workers then listen on nothing but 127.0.0.1."""
    import ray

    if address:
        ray.init(address=address, include_dashboard=False)
    else:
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")


def stop() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


RAY_START_FAILED = 3  # exit status of `serve --ray` when Ray itself cannot start on this machine


def run_forever(settings: ServerSettings, replicas: int, host: str, port: int, address: str | None,
                cpus_per_replica: float) -> None:
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
        start(settings, replicas, host, port, cpus_per_replica)
        print(f"serving {settings.served_name} on http://{host}:{port}/v1 with {replicas} Ray Serve replicas",
              flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop()
