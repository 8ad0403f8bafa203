"""Requests queued and run as left-padded batches on one pipeline, in one worker thread.

The event loop submits `Job`s; the worker takes the oldest job plus up to `max_batch - 1` queued jobs with
the same generation options but for their constraints (the runtime runs one set of options per batch, with a
response_format, regex or grammar per row), runs them with `pipeline.steps`, and posts each row's text pieces
(streamed jobs only) and result back to the job's event loop. A batch runs until its last row is done
(static batching). A job whose client has gone is dropped from the queue, or stops being served; when every row
of a running batch is gone, its generation stops at the next token. On shutdown, queued and running jobs are
answered 503 at the next token.

A job that continues a kept session's conversation (sessions.py) runs alone, as that session's next turn
(tool results and a user message, or either): a batch would have to prefill the whole conversation again,
which is what the session saves. A job that runs alone anyway and could start a conversation runs in a new
session (with the request's tools in its system prompt), which is then kept.

A streamed reply never shows a tool call's markup as text: its calls are posted as OpenAI `tool_calls`
deltas (tools.py), read from the text as it is generated.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from qwen2vl_edge.runtime.detokenize import safe_piece
from qwen2vl_edge.runtime import memory
from qwen2vl_edge.runtime.errors import InputError, MemoryShortage
from qwen2vl_edge.runtime.generation import GenerationOptions

from .errors import APIError
from .metrics import Metrics
from .sessions import Kept, SessionStore, conversation_key, encodes_as, prompt_tools, reply_message
from .tools import CallStream

log = logging.getLogger("qwen2vl_edge.server")
PER_ROW = ("response_format", "regex", "grammar")  # the options a batch takes per row (GenerationOptions)
TEXT = {"type": "text"}  # the response_format that constrains nothing
SHUTTING_DOWN = APIError(503, "the server is shutting down: retry on another replica", code="shutting_down")


@dataclass
class Job:
    conversation: list
    options: GenerationOptions
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # ("delta", str) | ("call", tool_calls delta)
    #                                                                 | ("done", result) | ("error", e)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)
    stream: bool = True  # text pieces are posted as they come; otherwise only the result
    prefix_key: str | None = None  # conversation_key of the conversation its new messages continue (job_keys)
    starts: bool = False  # a new session can run it (sessions.job_keys)
    emitted: str = ""  # text already sent as pieces
    calls: CallStream | None = None  # a streamed reply's tool calls, once the reply may make them
    started: bool = False  # first token seen

    @property
    def batch_key(self) -> Any:
        """Jobs batch together when their options are equal but for their constraints (each row has its own).
        A seeded sampled job runs alone: its draws must not depend on the rows beside it."""
        seeded = self.options.sampling.do_sample and self.options.seed is not None
        return self if seeded else replace(self.options, **dict.fromkeys(PER_ROW))

    def post(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


def batch_options(batch: list[Job]) -> GenerationOptions:
    """The options of a batch (its jobs' batch_key): the constraints as lists of one per row, where any row has
    one (a `text` response_format asks for none)."""
    first = batch[0].options
    per_row = {name: [None if value == TEXT else value for value in (getattr(job.options, name) for job in batch)]
               for name in PER_ROW}
    if all(value is None for values in per_row.values() for value in values):
        return first
    return replace(first, **per_row)


class Batcher:
    def __init__(self, pipe, max_batch: int, max_queue: int, batch_wait_s: float, metrics: Metrics,
                 max_sessions: int = 0, max_session_bytes: int | None = None):
        self.pipe, self.max_batch, self.max_queue, self.batch_wait_s = pipe, max_batch, max_queue, batch_wait_s
        self.metrics = metrics
        self.sessions = SessionStore(max_sessions, max_session_bytes)
        self._queue: deque[Job] = deque()
        self._ready = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._work, name="qwen2vl-batcher", daemon=True)
        self._thread.start()

    # -- event-loop side ----------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self._ready:
            if self._closing:
                raise SHUTTING_DOWN
            if len(self._queue) >= self.max_queue:
                raise APIError(503, f"the queue is full ({self.max_queue} requests waiting): retry later",
                               code="queue_full")
            self._queue.append(job)
            self.metrics.queue_depth.set(len(self._queue))
            self._ready.notify()

    def stop(self) -> None:
        """Refuse new jobs and answer every queued and running one 503; returns at once (any thread)."""
        with self._ready:
            self._closing = True
            for job in self._queue:
                job.post("error", SHUTTING_DOWN)
            self._queue.clear()
            self.metrics.queue_depth.set(0)
            self._ready.notify()

    def close(self) -> None:
        self.stop()
        self._thread.join()

    # -- worker side --------------------------------------------------------------------------

    def _take(self) -> tuple[list[Job], Kept | None] | None:
        """-> the next batch, and the kept session its one job continues (then the job runs alone)."""
        with self._ready:
            while not self._closing and not self._queue:
                self._ready.wait()
            if self._closing:
                return None
            self._ready.wait(self.batch_wait_s)  # let requests that arrive together share the batch
            if self._closing:
                return None
            first = self._queue.popleft()
            kept = None if first.cancelled.is_set() else self.sessions.take(first.prefix_key)
            batch = [first] + ([] if kept else [  # a job with a kept session waits for its own turn
                j for j in self._queue if j.batch_key == first.batch_key and not self.sessions.holds(j.prefix_key)
            ][:self.max_batch - 1])
            for job in batch[1:]:
                self._queue.remove(job)
            self.metrics.queue_depth.set(len(self._queue))
            for job in batch:  # a follow-up finds its session here, or runs afresh
                if job.prefix_key is not None:
                    self.metrics.follow_ups.labels(session="found" if job is first and kept else "missed").inc()
            return [j for j in batch if not j.cancelled.is_set()], kept

    def _work(self) -> None:
        while (taken := self._take()) is not None:
            batch, kept = taken
            if batch:
                self.metrics.batch_size.observe(len(batch))
                self._run(batch, kept)
            self.metrics.kept_sessions.set(len(self.sessions))
            self.metrics.kept_session_bytes.set(self.sessions.nbytes)

    def _run(self, batch: list[Job], kept: Kept | None = None) -> None:
        try:
            if kept is not None or (len(batch) == 1 and batch[0].starts and self.sessions.capacity > 0):
                self._turn(batch[0], kept)
            else:
                self._answer(batch, self._generate(batch, self.pipe.steps([j.conversation for j in batch],
                                                                          batch_options(batch))))
        except (InputError, APIError) as e:
            if self._free_kept(e):  # the request was refused for memory that kept sessions held: once more
                self._run(batch)
            elif len(batch) > 1:  # find the row at fault: the others still get their answers
                for job in batch:
                    self._run([job])
            else:
                batch[0].post("error", e)
        except Exception as e:  # a failure of ours: this batch's requests get a 500, the server keeps serving
            log.exception("generation failed")
            for job in batch:
                job.post("error", APIError(500, f"generation failed: {type(e).__name__}: {e}", code="internal"))

    def _free_kept(self, refusal: Exception) -> bool:
        """Kept sessions are a cache: a request is never refused for the memory their KV caches hold. After a
        refusal by what the system has now (not by a fixed memory_limit), drop them all -> whether any were."""
        if not (isinstance(refusal, MemoryShortage) and refusal.source != "memory_limit"):
            return False
        dropped = self.sessions.clear()
        if dropped:
            memory.give_back()
            log.warning("dropped %d kept sessions to make room for a request refused for memory", dropped)
        return dropped > 0

    def _turn(self, job: Job, kept: Kept | None) -> None:
        """The job as a session's turn: the kept session it continues, or a new one. A session that refuses the
        turn before generating (its context, memory) is dropped and the job runs afresh, as it would without
        sessions (the whole conversation: the runtime's own answer or error)."""
        opts = job.options
        try:
            if kept is None:  # the system message goes in with the first turn
                system = job.conversation[0]["content"] if job.conversation[0]["role"] == "system" else None
                kept = Kept(self.pipe.chat(system=system, tools=opts.tools,
                                           parallel_tool_calls=opts.parallel_tool_calls), [])
                new = job.conversation[-1:]
            else:
                new = job.conversation[len(kept.messages):]  # tool results, then a user message; or either
            content = new[-1]["content"] if new[-1]["role"] == "user" else None
            cached = len(kept.session.token_ids)
            results = self._generate([job], kept.session.steps(
                content, opts, tool_results=[m for m in new if m["role"] == "tool"] or None))
        except InputError:
            self._answer([job], self._generate([job], self.pipe.steps([job.conversation], opts)))
            return
        try:
            if results is not None:  # the turn is complete: the cache holds the conversation and the reply
                self._keep(kept, job, results[0], cached)
        finally:
            self._answer([job], results)  # after keeping: a follow-up sent on the answer finds its session kept

    def _keep(self, kept: Kept, job: Job, result, cached: int) -> None:
        """Keep the session under the conversation the client will send back, when its cache holds exactly
        what a fresh run of that conversation would (sessions.py)."""
        after = job.conversation + [reply_message(result)]
        tools = prompt_tools(job.options)
        key = conversation_key(after, tools)
        if key is not None and encodes_as(self.pipe, kept.messages, after, kept.session.token_ids, cached, tools):
            self.sessions.keep(key, Kept(kept.session, after, kept.session.cache_bytes))

    def _generate(self, batch: list[Job], steps) -> list | None:
        """Run `steps` (a batch's, or a session turn's), posting each row's text pieces to its job -> the
        results (`_answer` posts them), or None when the generation was stopped (shutdown, every client gone)."""
        while True:
            try:
                state = next(steps)
            except StopIteration as done:
                results = done.value
                break
            if self._closing or all(j.cancelled.is_set() for j in batch):
                steps.close()  # shutting down, or nobody is listening any more: stop generating
                self.metrics.cancelled_batches.inc()
                for job in batch:
                    job.post("error", SHUTTING_DOWN)  # unread by a client that has gone
                return None
            for job, text, finished, plan in zip(batch, state.texts, state.finished, state.plans):
                # the loop's incremental text (complete characters only); a finished row's final text,
                # cut at its stop string, comes with the result
                self._deliver(job, "" if finished else text.text, plan)
        return results

    @staticmethod
    def _answer(batch: list[Job], results: list | None) -> None:
        for job, result in zip(batch, results or []):
            if job.stream and result.text.startswith(job.emitted) and len(result.text) > len(job.emitted):
                job.post("delta", result.text[len(job.emitted):])  # held-back text, an incomplete last character
            if job.calls is not None:  # the arguments' held-back ends
                for delta in job.calls.finish(result.tool_calls):
                    job.post("call", delta)
            job.post("done", result)

    def _deliver(self, job: Job, text: str, plan) -> None:
        """Post a streamed job what its reply adds: text pieces (never a call's markup), tool call deltas."""
        if not job.started:
            job.started = True
            self.metrics.ttft.observe(time.perf_counter() - job.enqueued)
        if not job.stream or job.cancelled.is_set():  # a client that waits for the whole reply, or has gone
            return
        piece = safe_piece(plan.visible(text), job.options.stop + plan.markers, len(job.emitted))
        if piece:
            job.emitted += piece
            job.post("delta", piece)
        if plan.calls:
            if job.calls is None:
                job.calls = CallStream(plan.fmt)
            for delta in job.calls.update(text):
                job.post("call", delta)
