"""A pipeline shared by threads: calls take turns on the backend, and each reply is what it is alone."""

from __future__ import annotations

import threading

import pytest

from conftest import requires_torch

pytestmark = requires_torch

THREADS, CALLS, TOKENS = 4, 50, 4
PROMPTS = ["Hello.", "Count to five.", "Tell me a story about a robot.", "What is red?", "Why?",
           "Name three shapes.", "Where is the light?"]
SAMPLED = {"do_sample": True, "temperature": 0.9, "seed": 7}


class Overlaps:
    """The pipeline's own backend, counting its calls in flight at once: every call still runs the real graphs."""

    CALLS = ("vision", "merge", "new_cache", "reserve", "decode")

    def __init__(self, backend):
        self.backend, self.inside, self.most, self.threads = backend, 0, 0, set()
        self._count = threading.Lock()

    def __getattr__(self, name):
        attr = getattr(self.backend, name)
        if name not in self.CALLS:
            return attr

        def call(*args, **kwargs):
            with self._count:
                self.inside += 1
                self.most = max(self.most, self.inside)
                self.threads.add(threading.get_ident())
            try:
                return attr(*args, **kwargs)
            finally:
                with self._count:
                    self.inside -= 1

        return call


def request(i: int) -> tuple[str, list, dict]:
    """Call i: generate or stream, greedy or seeded sampling, over the prompts."""
    options = SAMPLED if i % 3 == 0 else {}
    conversation = [{"role": "user", "content": [{"type": "text", "text": PROMPTS[i % len(PROMPTS)]}]}]
    return ("stream" if i % 2 else "generate"), conversation, options


def reply(pipe, i: int) -> str:
    kind, conversation, options = request(i)
    if kind == "stream":
        return "".join(pipe.stream(conversation, max_new_tokens=TOKENS, **options))
    return pipe.generate(conversation, max_new_tokens=TOKENS, **options).text


@pytest.fixture
def watched(pipe):
    """The shared pipeline with its backend watched, restored afterwards."""
    backend = pipe.backend
    pipe.backend = Overlaps(backend)
    yield pipe
    pipe.backend = backend


def test_threads_take_turns_and_get_the_serial_replies(watched):
    pipe = watched
    serial = {i: reply(pipe, i) for i in range(THREADS * CALLS)}
    assert len(set(serial.values())) > len(PROMPTS)  # the replies differ: a mix-up between calls would show
    got: dict[int, str] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def work(t: int):
        start.wait()
        try:
            for i in range(t, THREADS * CALLS, THREADS):
                got[i] = reply(pipe, i)
        except BaseException as e:  # noqa: BLE001 (reported by the test's thread below)
            errors.append(e)

    pipe.backend.most, pipe.backend.threads = 0, set()
    workers = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(600)
    assert not errors, errors
    assert got == serial
    assert len(pipe.backend.threads) == THREADS  # every thread reached the backend
    assert pipe.backend.most == 1  # and never two at once


def test_streams_in_two_threads_interleave_by_turns(watched):
    """Two streams, each consumed in its own thread, alternate on the backend: neither waits for the other's end."""
    pipe = watched
    conversation = [{"role": "user", "content": [{"type": "text", "text": PROMPTS[2]}]}]
    pieces: dict[str, list] = {"a": [], "b": []}
    order: list[str] = []
    turn = {"a": threading.Event(), "b": threading.Event()}

    def consume(name: str, other: str):
        for piece in pipe.stream(conversation, max_new_tokens=24, min_new_tokens=24):
            pieces[name].append(piece)
            order.append(name)
            turn[other].set()  # hand over, then wait for the other stream's next piece (or its end)
            turn[name].wait(30)
            turn[name].clear()
        turn[other].set()

    threads = [threading.Thread(target=consume, args=("a", "b")), threading.Thread(target=consume, args=("b", "a"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert "".join(pieces["a"]) == "".join(pieces["b"]) == pipe.generate(
        conversation, max_new_tokens=24, min_new_tokens=24).text
    assert len(set(order[:6])) == 2  # both streams advanced before either ended
    assert pipe.backend.most == 1
