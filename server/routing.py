"""Session affinity on Ray Serve: a request that continues a conversation goes to the replica keeping its session.

Ray's HTTP proxy picks a replica before it reads a request's body, so it cannot know the conversation. The
front deployment (ray_serve.py) reads the body, computes the key a kept session of the conversation has
(`sessions.job_keys` on the decoded conversation, as the replica computes it) and calls a model replica
through a handle whose request router is `SessionAffinityRouter`, Ray Serve's mechanism for custom routing.
Every replica's answer ends with the keys of the sessions it keeps now; the front writes them into
`SESSIONS`, which the router, in the same process, reads.

A request with no kept session, or whose session's replica is gone, gets Ray's default choice (power of two
choices: the less loaded of two); so does one whose session's replica is full. A session is taken out of its
replica's store while its turn runs, so the conversation never pins a replica beyond its kept sessions.
"""

from __future__ import annotations

import hmac
import sys
import threading
from typing import Iterable

from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import LocalityMixin, MultiplexMixin, PendingRequest, RequestRouter, RunningReplica

from .app import parse_request
from .errors import APIError
from .sessions import job_keys
from .settings import ServerSettings
from . import protocol

from qwen2vl_edge.runtime.errors import InputError

SESSION_ARG = "session"  # the keyword argument of a replica call that carries the request's session key
CHAT_ROUTE = "/v1/chat/completions"


def _authorized(headers: Iterable[tuple[bytes, bytes]], api_key: str | None) -> bool:
    given = dict(headers).get(b"authorization", b"")
    return api_key is None or hmac.compare_digest(given, f"Bearer {api_key}".encode())


def session_key(scope: dict, body: bytes, settings: ServerSettings) -> str | None:
    """The key of the kept session this request would continue (None: it continues none, or is refused
    anyway). Images are decoded only for a request that continues a conversation, and only for a client
    that holds the API key: the replica refuses the others without looking at their images."""
    if (not settings.max_sessions or scope["method"] != "POST" or scope["path"] != CHAT_ROUTE
            or not _authorized(scope["headers"], settings.api_key)):
        return None
    try:
        req = parse_request(body)
        if len(req.messages) < 3:  # a first turn: nothing kept to find
            return None
        conversation = protocol.conversation(req, settings.limits, settings.allowed_media_dir)
        # only the tools the options hold enter the key: the replica checks max_tokens against its model's context
        opts = protocol.generation_options(req, settings.limits, context=sys.maxsize)
        return job_keys(conversation, opts)[0]
    except (APIError, InputError):  # the replica gives the client this error
        return None


class SessionTable:
    """The kept sessions of each replica (by Ray's unique replica id), as the replica last reported them.
    Written by the front's request handler, read by its router, which may run on another thread."""

    def __init__(self):
        self._keys: dict[str, frozenset[str]] = {}
        self._lock = threading.Lock()

    def report(self, replica: str, keys: Iterable[str]) -> None:
        with self._lock:
            self._keys[replica] = frozenset(keys)

    def holder(self, key: str | None, replicas: Iterable[str]) -> str | None:
        """The replica among `replicas` that keeps session `key`; None if none does. Replicas not among
        `replicas` (gone) are forgotten."""
        live = set(replicas)
        with self._lock:
            for gone in self._keys.keys() - live:
                del self._keys[gone]
            return next((r for r, keys in self._keys.items() if key in keys), None) if key else None


SESSIONS = SessionTable()  # one per process: the front's handler and its handle's router share it


class SessionAffinityRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """The replica that keeps the request's session first, then Ray's default choice. Not FIFO (Ray's
    FIFOMixin would hand the replica chosen for one request to the oldest waiting one)."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        # Ray ships this class to the front by value, with copies of the globals it names: the table is
        # imported here, from the module the front's handler writes to
        from qwen2vl_edge.server.routing import SESSIONS

        default = await PowerOfTwoChoicesRequestRouter.choose_replicas(self, candidate_replicas, pending_request)
        key = pending_request.kwargs.get(SESSION_ARG) if pending_request is not None else None
        holder = SESSIONS.holder(key, (r.replica_id.unique_id for r in candidate_replicas))
        first = [r for r in candidate_replicas if r.replica_id.unique_id == holder]
        return ([first] if first else []) + default
