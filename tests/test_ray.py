"""`serve --ray --replicas 2` run as an operator runs it: one local Ray cluster serves the whole module (each
start costs 20-40 s on a 2-core machine), in a network namespace that has nothing but loopback: Ray's GCS,
raylet and agents listen on every interface whatever node address they are given (seen with ray 2.60), and
a test's cluster must be reachable from this machine only.

The first test re-runs this module inside such a namespace, where the others run (outside it they skip).
The tests run in file order: the fourth stops the server; the last joins a cluster of its own.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai", reason="the server tests need the [test] extra (openai client)")
pytest.importorskip("fastapi", reason="the server tests need the [serve] extra")

from qwen2vl_edge.benchmarks.ray_stop import alive, descendants  # noqa: E402
from qwen2vl_edge.benchmarks.serve_bench import ServerProcess, free_port  # noqa: E402
from conftest import SERVER_KEY as KEY  # noqa: E402
from test_server import data_uri, get, image_chat  # noqa: E402

pytestmark = [pytest.mark.ray,
              pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the [ray] extra (ray[serve])")]
IN_NETNS = os.environ.get("QWEN2VL_EDGE_TEST_NETNS") == "1"
inside = pytest.mark.skipif(not IN_NETNS, reason="runs within test_in_a_loopback_only_network_namespace")
INSIDE_TESTS = 5
SYSTEM = {"role": "system", "content": "You look at pictures."}
# Replies of the tiny random model are random tokens, which often do not re-tokenise to themselves; a session
# is kept only when they do (server/sessions.py). These conversations' replies do, on one process.
CONVERSATIONS = [(f"Tell me about picture {i}.", "And then?", "Why?") for i in (0, 7, 8, 9)]


def test_in_a_loopback_only_network_namespace():
    if IN_NETNS:
        pytest.skip("this is the run inside the namespace")
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("the Ray tests run in a network namespace of their own: needs root, unshare and ip")
    script = 'ip link set lo up && exec "$0" -m pytest -q -p no:cacheprovider "$1"'
    result = subprocess.run(["unshare", "--net", "sh", "-c", script, sys.executable, __file__],
                            env={**os.environ, "QWEN2VL_EDGE_TEST_NETNS": "1"}, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert f"{INSIDE_TESTS} passed" in result.stdout, result.stdout[-3000:]  # ran, not skipped


@pytest.mark.skipif(IN_NETNS, reason="needs no cluster: ran outside the namespace")
def test_the_front_keys_a_follow_up_as_the_replica_keeps_its_session(images, media_dir, workdir):
    """The routing key of a follow-up is the key its replica keeps the session under (the image as pixels,
    however it was sent); nothing is decoded for a first turn, a client without the API key, or a body that
    is no request."""
    from PIL import Image

    from qwen2vl_edge.server import Limits, ServerSettings
    from qwen2vl_edge.server.routing import session_key
    from qwen2vl_edge.server.sessions import conversation_key

    settings = ServerSettings(artifact=workdir, api_key=KEY, allowed_media_dir=media_dir, limits=Limits())
    scope = {"method": "POST", "path": "/v1/chat/completions",
             "headers": [(b"authorization", f"Bearer {KEY}".encode())]}
    history = [SYSTEM, {"role": "user", "content": "Look."}, {"role": "assistant", "content": "I see."}]

    def body(image_url: str, messages: list[dict]) -> bytes:
        first = image_chat(image_url, "Look.")
        return json.dumps({"model": "m", "messages": [SYSTEM, *first, *messages]}).encode()

    follow_up = [history[2], {"role": "user", "content": "Why?"}]
    kept = conversation_key([SYSTEM, {"role": "user", "content": [{"type": "image", "image": Image.open(images["c"])},
                                                                   {"type": "text", "text": "Look."}]}, history[2]])
    assert session_key(scope, body(data_uri(images["c"]), follow_up), settings) == kept
    assert session_key(scope, body(str(media_dir / "c.png"), follow_up), settings) == kept
    assert session_key(scope, body(data_uri(images["b"]), follow_up), settings) not in (kept, None)
    assert session_key(scope, body(data_uri(images["c"]), []), settings) is None  # a first turn
    assert session_key(scope, b"{not json", settings) is None
    stranger = {**scope, "headers": [(b"authorization", b"Bearer wrong")]}
    assert session_key(stranger, body(data_uri(images["c"]), follow_up), settings) is None  # its images unread


@pytest.fixture(scope="module")
def server(tiny_artifact, workdir):
    from qwen2vl_edge.server.ray_serve import RAY_START_FAILED

    srv = ServerProcess([str(tiny_artifact), "--ray", "--replicas", "2", "--threads", "1", "--api-key", KEY],
                        workdir / "ray-server.log", ready_timeout=300)
    if srv.proc.poll() == RAY_START_FAILED:
        lines = [line for line in srv.output().splitlines() if "Ray could not start" in line]
        pytest.skip(lines[-1] if lines else srv.output()[-500:])
    assert srv.proc.poll() is None, srv.output()[-3000:]
    yield srv
    srv.stop()


def _ask(client, model, messages, **options):
    """-> (reply, the replica that answered, cached prompt tokens)."""
    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages,
                                                            **{"max_tokens": 16, "temperature": 0, **options})
    reply = raw.parse()
    details = reply.usage.prompt_tokens_details
    return reply, raw.headers["x-qwen2vl-replica"], (details.cached_tokens or 0) if details else 0


def _replica_metrics(url: str) -> dict[str, str]:
    """/metrics of every replica (the front hands each GET to one of them), by replica."""
    seen: dict[str, str] = {}
    for _ in range(100):
        _, headers, text = get(f"{url}/metrics")
        seen[headers["x-qwen2vl-replica"]] = text
        if len(seen) == 2:
            return seen
    raise AssertionError(f"/metrics reached only {sorted(seen)}")


def _count(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


@inside
def test_replicas_spread_and_equal_the_single_process(server, client, model, pipe, images):
    replicas = set()
    for i in range(12):
        path = images["c" if i % 2 else "b"]
        reply, replica, _ = _ask(client, model, image_chat(data_uri(path), f"Question {i % 3}?"), max_tokens=8)
        replicas.add(replica)
        expected = pipe.generate([{"role": "user", "content": [{"type": "image", "image": str(path)},
                                                               {"type": "text", "text": f"Question {i % 3}?"}]}],
                                 max_new_tokens=8)
        assert reply.choices[0].message.content == expected.text, i
    assert len(replicas) == 2, replicas


@inside
def test_follow_ups_reach_the_replica_that_keeps_their_session(server, client, model):
    """Four three-turn conversations on two replicas: every follow-up finds its session (cached tokens, the
    same replica, /metrics); new conversations sent together still spread over both replicas."""
    with ThreadPoolExecutor(8) as pool:
        firsts = list(pool.map(lambda i: _ask(client, model, [SYSTEM, {"role": "user", "content": f"Hi {i}."}]),
                               range(8)))
    assert len({replica for _, replica, _ in firsts}) == 2, firsts
    before = {r: _count(t, 'qwen2vl_follow_ups_total{session="found"}')
              for r, t in _replica_metrics(server.url).items()}
    # one conversation at a time: first turns that arrive together run as one batch, which keeps no session
    for first, *follow_ups in CONVERSATIONS:
        history = [SYSTEM, {"role": "user", "content": first}]
        reply, replica, _ = _ask(client, model, history)
        for question in follow_ups:
            held = reply.usage.prompt_tokens + reply.usage.completion_tokens
            history += [{"role": "assistant", "content": reply.choices[0].message.content},
                        {"role": "user", "content": question}]
            reply, again, cached = _ask(client, model, history)
            # the previous prompt and reply came from the kept session, but the reply's last token
            assert (again, cached) == (replica, held - 1), (first, question)
    after = _replica_metrics(server.url)
    found = sum(_count(t, 'qwen2vl_follow_ups_total{session="found"}') - before.get(r, 0) for r, t in after.items())
    assert found == 8
    assert sum(_count(t, 'qwen2vl_follow_ups_total{session="missed"}') for t in after.values()) == 0


class Traffic:
    """Two clients sending short requests, and a /health poller, until stopped: each request's start time,
    status and replica or error."""

    def __init__(self, url: str, client, model: str):
        self.url, self.client, self.model = url, client, model
        self.results: list[tuple[float, int, str]] = []
        self.health: list[int] = []
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self._send, args=(i,)) for i in range(2)]
        self.threads.append(threading.Thread(target=self._poll_health))
        for t in self.threads:
            t.start()

    def _send(self, i: int) -> None:
        n = 0
        while not self.stopped.is_set():
            t0 = time.monotonic()
            try:
                _, replica, _ = _ask(self.client, self.model, [{"role": "user", "content": f"Client {i}, {n}."}],
                                     max_tokens=4)
                self.results.append((t0, 200, replica))
            except openai.APIError as e:  # a status and message, or a connection that failed (status 0)
                self.results.append((t0, getattr(e, "status_code", 0), e.message))
            n += 1

    def _poll_health(self) -> None:
        while not self.stopped.is_set():
            self.health.append(get(f"{self.url}/health")[0])
            time.sleep(0.2)

    def stop(self) -> None:
        self.stopped.set()
        for t in self.threads:
            t.join(120)


@inside
def test_a_dead_replica_costs_at_most_its_own_requests(server, client, model):
    """SIGKILL to the replica serving a stream while two clients send: the stream ends with an SSE error
    event; of the clients' requests at most the two in flight fail, with the replica's death as the error;
    every later one is answered; Ray's replacement joins; /health stays 200."""
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Go on."}], max_tokens=30000, stream=True)
    victim = raw.headers["x-qwen2vl-replica"]
    pieces = iter(raw.parse())
    next(pieces)
    traffic = Traffic(server.url, client, model)
    try:
        while len(traffic.results) < 4:  # the clients are under way
            time.sleep(0.05)
        killed = time.monotonic()
        os.kill(int(victim.rsplit(":", 1)[1]), signal.SIGKILL)
        with pytest.raises(openai.APIError, match="the replica serving this request stopped"):
            list(pieces)
        told = time.monotonic()
        replicas = {victim} | {r for _, status, r in traffic.results if status == 200}
        deadline = time.monotonic() + 240  # a hang guard: the replacement loads its pipeline (~20 s here)
        while not {r for t, status, r in traffic.results if status == 200 and t > killed} - replicas:
            assert time.monotonic() < deadline, "no replacement replica answered"
            time.sleep(0.5)
    finally:
        traffic.stop()
    failed = [(t, status, r) for t, status, r in traffic.results if status != 200]
    assert len(failed) <= 2 and all("replica" in r and t < told for t, _, r in failed), failed
    assert all(status == 200 for t, status, _ in traffic.results if t > told)
    assert set(traffic.health) == {200}, traffic.health


@inside
def test_sigterm_answers_the_stream_and_stops_serve_and_ray(server, client, model):
    """SIGTERM with a stream in flight: the stream ends with the 503 a single process gives, the server exits
    0 and every process it started (Ray's GCS, raylet, workers, replicas) is gone."""
    pieces = iter(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi."}],
                                                     max_tokens=30000, stream=True))
    next(pieces)
    started = descendants(server.proc.pid)
    assert server.stop(timeout=120) == 0, server.output()[-3000:]
    with pytest.raises(openai.APIError, match="shutting down"):
        list(pieces)
    deadline = time.monotonic() + 60  # a hang guard, not the bar (benchmarks/ray_stop.py measures it)
    while any(alive(p) for p in started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in started if alive(p)]
    assert "Traceback" not in server.output()


# on a joined cluster after the server stopped: its Serve apps, and its Serve's HTTP proxies (Serve still up)
SERVE_LEFT = ("import json, sys, ray; from ray import serve; ray.init(address=sys.argv[1]); s = serve.status(); "
              "print(json.dumps([sorted(s.applications), len(s.proxies)]))")


@pytest.fixture
def ray_cluster(monkeypatch, workdir):
    """A Ray head of its own (`ray start --block`, so that its processes are this test's children), on
    127.0.0.1 with a temp dir of its own -> its address. Token auth is off: the cluster is reachable from
    this namespace only, and a token in ~/.ray belongs to whoever made it. Stopped by its pids (never
    `ray stop`, which stops every Ray of the user on the machine)."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # for the head, the server and the check alike
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's unix sockets live under it
    address, log = f"127.0.0.1:{free_port()}", workdir / "ray-head.log"
    # this interpreter, not a `ray` script elsewhere: the workers run the same Python, with this package
    head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                             "--node-ip-address", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                             "--include-dashboard=false", "--num-cpus", "2", "--disable-usage-stats",
                             "--temp-dir", temp], stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180  # a hang guard: the head writes its address once it is up
        while not os.path.exists(os.path.join(temp, "ray_current_cluster")):
            assert head.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(0.5)
        yield address, head
    finally:
        started = descendants(head.pid)
        head.send_signal(signal.SIGTERM)  # the head stops what it started
        try:
            head.wait(60)
        finally:
            head.kill()  # no-op once it exited
            for pid in (p for p in started if alive(p)):
                with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                    os.kill(pid, signal.SIGKILL)
            shutil.rmtree(temp, ignore_errors=True)


@inside
def test_sigterm_leaves_a_joined_cluster_running(ray_cluster, tiny_artifact, workdir):
    """`serve --ray --ray-address`: SIGTERM deletes this app only; the cluster it joined keeps running, and
    its Serve has no app left."""
    address, head = ray_cluster
    srv = ServerProcess([str(tiny_artifact), "--ray", "--ray-address", address, "--replicas", "1",
                         "--threads", "1", "--api-key", KEY], workdir / "ray-joined.log", ready_timeout=300)
    try:
        assert srv.proc.poll() is None, srv.output()[-3000:]
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0, timeout=120)
        reply = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=4,
                                               messages=[{"role": "user", "content": "Hi."}])
        assert reply.usage.completion_tokens > 0
    finally:
        status = srv.stop(timeout=120)  # SIGTERM; the same hang guard as the stop of the server it started
    assert status == 0, srv.output()[-3000:]
    assert "Traceback" not in srv.output()
    left = subprocess.run([sys.executable, "-c", SERVE_LEFT, address], capture_output=True, text=True, timeout=120)
    assert left.returncode == 0, left.stderr[-3000:]
    assert json.loads(left.stdout.splitlines()[-1]) == [[], 1]  # no app, and Serve for the cluster's other apps
    assert head.poll() is None  # `ray start --block` exits when one of the head's processes fails
