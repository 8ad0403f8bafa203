"""`qwen2vl-edge serve` as a real process on 127.0.0.1, driven by the official `openai` client.

One server process (conftest's `server`, shared with test_server_agents.py; with an API key and small limits,
so each limit can be hit) serves the whole module; its answers are compared with the in-process pipeline on
the same tiny artifact. Qwen2.5-VL's image chat is served by an app in this process (`family_server`).
"""

from __future__ import annotations

import base64
import json
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

openai = pytest.importorskip("openai", reason="the server tests need the [test] extra (openai client)")
pytest.importorskip("fastapi", reason="the server tests need the [serve] extra")

from conftest import SERVER_KEY as KEY  # noqa: E402
from conftest import in_process_server  # noqa: E402
from qwen2vl_edge.benchmarks.serve_bench import ServerProcess  # noqa: E402

MAX_TOKENS = 16


def get(url: str, key: str | None = None) -> tuple[int, dict, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def post(url: str, body: bytes, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_chat(uri: str, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                         {"type": "text", "text": text}]}]


def as_runtime(messages: list[dict], path: Path | None) -> list[dict]:
    """The same conversation for pipe.generate, the image as the file it was encoded from."""
    content = [{"type": "image", "image": str(path)}] if path else []
    return [{"role": "user", "content": content + [p for p in messages[0]["content"] if p["type"] == "text"]}]


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


@pytest.fixture
def family_server(request, family, family_pipe, media_dir):
    """-> (client, model, the pipeline it serves): Qwen2-VL's is conftest's `server` process; another family's
    portable pipeline is served by an app of its own in this process (its local files: `media_dir` too)."""
    if family == "qwen2_vl":
        yield request.getfixturevalue("client"), request.getfixturevalue("model"), request.getfixturevalue("pipe")
        return
    from qwen2vl_edge.server.app import create_app
    from qwen2vl_edge.server.settings import ServerSettings

    served = family_pipe(family, "portable")
    settings = ServerSettings(served.artifact.dir, allowed_media_dir=media_dir)
    with in_process_server(create_app(settings, served)) as url:
        yield (openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120),
               settings.served_name, served)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_image_chat_equals_pipeline(family_server, images, media_dir, family):
    client, model, pipe = family_server
    messages = image_chat(data_uri(images["c"]), "Describe this image.")
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    expected = pipe.generate(as_runtime(messages, images["c"]), max_new_tokens=MAX_TOKENS)
    choice = reply.choices[0]
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == expected.usage["prompt_tokens"]
    assert reply.usage.completion_tokens == len(expected.token_ids) == MAX_TOKENS
    assert len(set(expected.token_ids)) >= MAX_TOKENS // 2  # varied tokens: not a degenerate reply
    # the same image as a local file under --allowed-media-dir gives the same reply; another image another
    local = client.chat.completions.create(model=model, messages=image_chat(str(media_dir / "c.png"),
                                                                            "Describe this image."),
                                           max_tokens=MAX_TOKENS, temperature=0)
    assert local.choices[0].message.content == expected.text
    other = client.chat.completions.create(model=model, messages=image_chat(data_uri(images["b"]),
                                                                            "Describe this image."),
                                           max_tokens=MAX_TOKENS, temperature=0)
    assert other.choices[0].message.content != expected.text


def test_image_by_http_url(client, model, pipe, images, workdir):
    """An http:// image URL is fetched by the server (here from a file server on 127.0.0.1)."""
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(images["c"].parent))
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_address[1]}"
    (images["c"].parent / "note.txt").write_text("not an image")
    try:
        reply = client.chat.completions.create(model=model, max_tokens=MAX_TOKENS, temperature=0,
                                               messages=image_chat(f"{base}/{images['c'].name}", "Describe."))
        expected = pipe.generate(as_runtime(image_chat("", "Describe."), images["c"]), max_new_tokens=MAX_TOKENS)
        assert reply.choices[0].message.content == expected.text
        for url, word in ((f"{base}/note.txt", "content-type"), (f"{base}/missing.png", "could not fetch")):
            status, body = _status_of(lambda: client.chat.completions.create(
                model=model, max_tokens=4, messages=image_chat(url, "x")))
            assert status == 400 and word in body["message"].lower(), body
    finally:
        files.shutdown()


def test_stream_joins_to_the_same_text(client, model, server, images):
    messages = image_chat(data_uri(images["b"]), "What is in it?")
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    pieces, usage = [], None
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS,
                                                temperature=0, stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert len(pieces) > 1
    assert "".join(pieces) == whole.choices[0].message.content
    assert usage.completion_tokens == whole.usage.completion_tokens
    # on the wire: server-sent events closed by `data: [DONE]`
    body = json.dumps({"model": model, "messages": messages, "max_tokens": 4, "stream": True}).encode()
    request = urllib.request.Request(f"{server.url}/v1/chat/completions", body,
                                     {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in r.read().decode().splitlines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"


def test_video_frames_extension(client, model, pipe, images):
    frames = [images["c"]] * 4
    part = {"type": "video", "video": [data_uri(f) for f in frames]}
    reply = client.chat.completions.create(model=model, max_tokens=MAX_TOKENS, temperature=0, messages=[
        {"role": "user", "content": [part, {"type": "text", "text": "What happens?"}]}])
    expected = pipe.generate([{"role": "user", "content": [{"type": "video", "video": [str(f) for f in frames]},
                                                           {"type": "text", "text": "What happens?"}]}],
                             max_new_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == expected.usage["prompt_tokens"]


def test_concurrent_clients_batch_and_equal_serial(client, model, server, pipe, images, workdir):
    """A long streamed request keeps the worker busy while 8 clients queue; it then disconnects, which stops
    its generation, and the 8 run as one batch. One of them has an image the model refuses (aspect ratio
    over 200): it gets its 400 and the 7 others their answers, each equal to pipe.generate run alone."""
    sources = [None, images["c"], images["b"], None, images["c"], None, images["b"]]
    texts = ["Hello there.", "Describe.", "What colour dominates?", "Count to five.", "Is it dark?",
             "Tell me a story about a robot.", "Where is the light?", "Name three shapes."]
    chats = [image_chat(data_uri(p), t) if p else [{"role": "user", "content": [{"type": "text", "text": t}]}]
             for p, t in zip(sources, texts)]
    sliver = workdir / "sliver.png"
    Image.new("RGB", (300, 1), (200, 30, 30)).save(sliver)
    chats.append(image_chat(data_uri(sliver), texts[7]))
    before = get(f"{server.url}/metrics")[2]
    blocker = client.chat.completions.create(model=model, messages=chats[0], max_tokens=30000, temperature=0,
                                             stream=True)
    next(iter(blocker))  # the worker is generating it now
    answers: dict[int, object] = {}

    def ask(i):
        try:
            answers[i] = client.chat.completions.create(model=model, messages=chats[i], max_tokens=MAX_TOKENS,
                                                        temperature=0)
        except openai.APIStatusError as e:
            answers[i] = e

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while metric(get(f"{server.url}/metrics")[2], "qwen2vl_queue_depth") < 8:
        assert time.monotonic() < deadline, "the 8 requests never queued up"
        time.sleep(0.05)
    blocker.close()  # the client goes away
    for t in threads:
        t.join(120)
    assert sorted(answers) == list(range(8))
    assert isinstance(answers[7], openai.BadRequestError) and "aspect ratio" in answers[7].message, answers[7]
    for i, chat in enumerate(chats[:7]):
        expected = pipe.generate(as_runtime(chat, sources[i]), max_new_tokens=MAX_TOKENS)
        assert answers[i].choices[0].message.content == expected.text, i
        assert answers[i].usage.prompt_tokens == expected.usage["prompt_tokens"], i
    after = get(f"{server.url}/metrics")[2]
    assert metric(after, "qwen2vl_cancelled_batches_total") == metric(before, "qwen2vl_cancelled_batches_total") + 1
    batches_of_8 = (metric(after, 'qwen2vl_batch_size_bucket{le="8.0"}')
                    - metric(after, 'qwen2vl_batch_size_bucket{le="4.0"}'))
    assert batches_of_8 - (metric(before, 'qwen2vl_batch_size_bucket{le="8.0"}')
                           - metric(before, 'qwen2vl_batch_size_bucket{le="4.0"}')) == 1


def _status_of(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as err:
        call()
    return err.value.status_code, err.value.body


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, model, server, images, media_dir,
                                                                     workdir):
    ask = lambda **kw: client.chat.completions.create(**{"model": model, "max_tokens": 4, **kw})  # noqa: E731
    text = [{"role": "user", "content": "hi"}]
    corrupt = "data:image/png;base64," + base64.b64encode(images["c"].read_bytes()[:200]).decode()
    outside = workdir / "outside.png"
    outside.write_bytes(images["c"].read_bytes())
    cases = {
        "corrupt image": (lambda: ask(messages=image_chat(corrupt, "x")), 400, "image"),
        "not base64": (lambda: ask(messages=image_chat("data:image/png;base64,@@@", "x")), 400, "base64"),
        "not an image": (lambda: ask(messages=image_chat(
            "data:image/png;base64," + base64.b64encode(b"hello" * 40).decode(), "x")), 400, "decode"),
        "too many pixels": (lambda: ask(messages=image_chat(data_uri(images["a"]), "x")), 413, "pixels"),
        "path outside media dir": (lambda: ask(messages=image_chat(str(outside), "x")), 400, "outside"),
        "temperature": (lambda: ask(messages=text, temperature=5), 400, "temperature"),
        "top_p": (lambda: ask(messages=text, top_p=0), 400, "top_p"),
        "n": (lambda: ask(messages=text, n=2), 400, "n"),
        "max_tokens": (lambda: ask(messages=text, max_tokens=0), 400, "max_tokens"),
        "over the context": (lambda: ask(messages=text, max_tokens=10**6), 400, "context"),
        "empty messages": (lambda: ask(messages=[]), 400, "messages"),
        "unknown part": (lambda: ask(messages=[{"role": "user", "content": [{"type": "input_audio"}]}]), 400,
                         "input_audio"),
        "logit_bias": (lambda: ask(messages=text, logit_bias={"42": 5}), 400, "logit_bias"),
        "functions": (lambda: ask(messages=text, extra_body={"functions": [{"name": "f"}]}), 400, "functions"),
        "unknown model": (lambda: client.chat.completions.create(model="nope", messages=text), 404, "nope"),
        "oversized body": (lambda: ask(messages=[{"role": "user", "content": "x" * (1 << 21)}]), 413, "limit"),
    }
    for name, (call, status, word) in cases.items():
        got, body = _status_of(call)
        assert got == status, (name, body)
        assert word in body["message"].lower() or word == body.get("param"), (name, body)
        assert set(body) >= {"message", "type", "param", "code"}, name
        assert status != 400 or body["type"] == "invalid_request_error", (name, body)
    assert post(f"{server.url}/v1/chat/completions", b"{not json")[0] == 400
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    assert _status_of(lambda: wrong.chat.completions.create(model=model, messages=text))[0] == 401
    assert post(f"{server.url}/v1/chat/completions", b"{}", key=None)[0] == 401
    assert get(f"{server.url}/v1/models")[0] == 401
    # still serving, and the errors were counted
    assert ask(messages=text).choices[0].message.content
    status, headers, metrics = get(f"{server.url}/metrics")
    assert status == 200 and "x-qwen2vl-replica" in {k.lower() for k in headers}
    assert metric(metrics, 'qwen2vl_requests_total{route="/v1/chat/completions",status="400"}') >= 5
    assert server.proc.poll() is None


def raw_post(url: str, body, headers: dict) -> tuple[int, dict]:
    """POST with http.client: a body of bytes (Content-Length) or an iterable of chunks (chunked encoding)."""
    import http.client
    from urllib.parse import urlsplit

    address = urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=120)
    try:
        connection.request("POST", address.path, body, {"Authorization": f"Bearer {KEY}", **headers},
                           encode_chunked=not isinstance(body, bytes))
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_an_oversized_body_is_answered_413(server, model):
    """A body over --max-body-mb (1 MiB here) much larger than the sockets' buffers, with a Content-Length and
    chunked, from a client that asks for the connection to close after the answer: it gets the 413, not a
    reset connection (which it got when the server answered without reading the rest), and the server goes on."""
    url = f"{server.url}/v1/chat/completions"
    big = json.dumps({"model": model, "messages": [{"role": "user", "content": "x" * (16 << 20)}]}).encode()
    for body, headers in ((big, {"Content-Type": "application/json", "Connection": "close"}),
                          ((big[i:i + (1 << 20)] for i in range(0, len(big), 1 << 20)), {"Connection": "close"})):
        status, answer = raw_post(url, body, headers)
        assert status == 413 and answer["error"]["code"] == "request_too_large", answer
        assert "limit" in answer["error"]["message"]
    assert post(url, json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}],
                                 "max_tokens": 2}).encode())[0] == 200


def test_a_deeply_nested_body_is_a_400(server):
    for bomb in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000):
        status, body = post(f"{server.url}/v1/chat/completions", bomb)
        assert status == 400 and "nested too deeply" in body["error"]["message"], body
        assert body["error"]["type"] == "invalid_request_error"
    assert get(f"{server.url}/health")[0] == 200


def test_openapi_describes_chat_completions_and_the_answers_fit(server, model, images):
    """/openapi.json names the request, reply, stream chunk and error models of /v1/chat/completions (every
    reference resolves), /docs serves the page drawn from it, and real answers validate against the models."""
    from qwen2vl_edge.server import openapi

    status, _, text = get(f"{server.url}/openapi.json")
    document = json.loads(text)
    route = document["paths"]["/v1/chat/completions"]["post"]
    schemas = document["components"]["schemas"]
    refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', text))
    assert status == 200 and refs <= set(schemas), refs - set(schemas)
    assert route["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatRequest")
    assert {"model", "messages", "max_tokens", "stream"} <= set(schemas["ChatRequest"]["properties"])
    assert schemas["ChatRequest"]["additionalProperties"] is False  # unknown fields are refused
    assert route["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletion")
    assert "422" not in route["responses"]
    assert all(route["responses"][s]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
               for s in ("400", "401", "404", "413", "503"))
    status, headers, page = get(f"{server.url}/docs")
    assert status == 200 and "swagger" in page.lower() and "/openapi.json" in page
    messages = image_chat(data_uri(images["c"]), "Describe.")
    url = f"{server.url}/v1/chat/completions"
    status, reply = post(url, json.dumps({"model": model, "messages": messages, "max_tokens": 4}).encode())
    assert status == 200
    openapi.ChatCompletion.model_validate(reply)
    request = urllib.request.Request(url, json.dumps({"model": model, "messages": messages, "max_tokens": 4,
                                                      "stream": True, "stream_options": {"include_usage": True}}
                                                     ).encode(),
                                     {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=60) as r:
        events = [line[len("data: "):] for line in r.read().decode().splitlines() if line]
    assert events[-1] == "[DONE]" and len(events) > 3
    for event in events[:-1]:
        openapi.ChatCompletionChunk.model_validate_json(event)
    openapi.ErrorResponse.model_validate(post(url, b"{}")[1])


def test_clean_shutdown(tiny_artifact, workdir):
    """SIGTERM with a long generation in flight: the stream ends with a 503 error event and [DONE], the app's
    shutdown completes, the port is released. uvicorn exits by re-raising the signal it handled."""
    srv = ServerProcess([str(tiny_artifact)], workdir / "server-shutdown.log")
    name = get(f"{srv.url}/v1/models")[2]
    stream = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0).chat.completions.create(
        model=json.loads(name)["data"][0]["id"], messages=[{"role": "user", "content": "hi"}], max_tokens=30000,
        stream=True)
    pieces = iter(stream)
    next(pieces)
    assert srv.stop() == -signal.SIGTERM, srv.output()
    with pytest.raises(openai.APIError, match="shutting down"):
        list(pieces)
    assert "Application shutdown complete" in srv.output()
    assert "Traceback" not in srv.output()
    with pytest.raises(OSError):
        get(f"{srv.url}/health")


def test_bench_serve_level_measures_what_it_served(server, model):
    from qwen2vl_edge.benchmarks.serve_bench import run_level

    level = run_level(server.url, model, concurrency=2, requests=3, new_tokens=5, side=48, api_key=KEY)
    assert (level["requests"], level["concurrency"]) == (3, 2)
    assert level["generated_tokens_per_s"] == pytest.approx(3 * 5 / level["wall_s"], rel=0.02)
    assert 0 < level["ttft_p50_s"] <= level["ttft_p95_s"] <= level["wall_s"]
    assert len(level["replicas"]) == 1 and level["replicas"][0].endswith(f":{server.proc.pid}")


def test_bad_artifact_fails_before_serving(workdir):
    srv = ServerProcess([str(workdir / "no-such-artifact")], workdir / "server-bad.log")
    assert srv.proc.wait(60) == 2
    assert srv.output().startswith("error:") and "no-such-artifact" in srv.output(), srv.output()


def test_a_stop_while_ray_replicas_start_shuts_serve_down(monkeypatch):
    """CI once sent SIGTERM while `serve.run` was still waiting on replicas that already answered: Ray's own
    handler (`sys.exit(15)`, installed by ray.init) ran, and Serve was never shut down. Here init_ray
    installs a handler like Ray's and the replicas' start is interrupted by the SIGTERM."""
    import os
    import sys
    from types import SimpleNamespace

    from qwen2vl_edge.runtime import artifact
    from qwen2vl_edge.server import ray_serve

    calls = []

    def init_ray(address):
        calls.append("init")
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # what ray.init installs

    def start(*args):
        calls.append("start")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # Python runs the handler here, between bytecodes
        calls.append("started")

    monkeypatch.setattr(artifact, "load_artifact", lambda *args, **kwargs: None)
    monkeypatch.setattr(ray_serve, "init_ray", init_ray)
    monkeypatch.setattr(ray_serve, "start", start)
    monkeypatch.setattr(ray_serve, "stop", lambda joined: calls.append("stop"))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    settings = SimpleNamespace(artifact="unused", backend="onnxruntime", served_name="unused")
    try:
        ray_serve.run_forever(settings, replicas=2, host="127.0.0.1", port=0, address=None, cpus_per_replica=1.0)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert calls == ["init", "start", "stop"]


def test_the_batcher_posts_pieces_to_streamed_jobs_only(pipe):
    """A non-streamed job's client waits for the whole reply: the worker posts it the result alone."""
    import asyncio

    from qwen2vl_edge.runtime.generation import GenerationOptions
    from qwen2vl_edge.server.batcher import Batcher, Job
    from qwen2vl_edge.server.metrics import Metrics

    async def events(stream: bool) -> list[tuple]:
        job = Job([{"role": "user", "content": "Count to ten."}], GenerationOptions(max_new_tokens=MAX_TOKENS),
                  asyncio.get_running_loop(), stream=stream)
        batcher.submit(job)
        got = [await job.events.get()]
        while got[-1][0] == "delta":
            got.append(await job.events.get())
        return got

    batcher = Batcher(pipe, 8, 8, 0.0, Metrics())
    try:
        streamed, whole = asyncio.run(events(True)), asyncio.run(events(False))
    finally:
        batcher.close()
    assert [kind for kind, _ in whole] == ["done"]
    assert len(streamed) > 2 and [kind for kind, _ in streamed[:-1]] == ["delta"] * (len(streamed) - 1)
    assert "".join(piece for _, piece in streamed[:-1]) == streamed[-1][1].text == whole[0][1].text


def test_kept_sessions_are_dropped_before_a_request_is_refused_for_memory(pipe, monkeypatch):
    """Kept sessions are a cache: a request refused for the memory the system has now runs again once they are
    dropped, and gets the reply it gets alone; a refusal by a fixed memory_limit drops nothing."""
    import asyncio

    from qwen2vl_edge.runtime import memory
    from qwen2vl_edge.runtime.generation import GenerationOptions
    from qwen2vl_edge.server.batcher import Batcher, Job
    from qwen2vl_edge.server.metrics import Metrics
    from qwen2vl_edge.server.sessions import Kept

    conversation = [{"role": "user", "content": "Count to ten."}]

    async def answer():
        job = Job(conversation, GenerationOptions(max_new_tokens=MAX_TOKENS), asyncio.get_running_loop(),
                  stream=False)
        batcher.submit(job)
        return await job.events.get()

    def keep_one():
        session = pipe.chat(max_new_tokens=4)
        session.send("Hello!")  # its cache holds memory
        batcher.sessions.keep("earlier", Kept(session, []))

    batcher = Batcher(pipe, 8, 8, 0.0, Metrics(), max_sessions=0)  # new requests run without sessions
    batcher.sessions.capacity = 4  # but the store can hold the one kept by hand
    try:
        keep_one()
        # the system's memory, as the check sees it: too little while a session is kept
        monkeypatch.setattr(memory, "available", lambda limit=None: (1 if len(batcher.sessions) else 1 << 50,
                                                                     "MemAvailable"))
        kind, result = asyncio.run(answer())
        assert kind == "done" and len(batcher.sessions) == 0
        assert result.text == pipe.generate(conversation, max_new_tokens=MAX_TOKENS).text
        keep_one()
        monkeypatch.setattr(memory, "available", lambda limit=None: (1, "memory_limit"))
        kind, error = asyncio.run(answer())
        assert kind == "error" and "memory_limit" in str(error) and len(batcher.sessions) == 1
    finally:
        batcher.close()


def test_kept_sessions_are_bounded_by_the_bytes_of_their_caches(pipe, images):
    """The batcher keeps a session with what its KV cache holds; a bound below that keeps none."""
    import asyncio

    from qwen2vl_edge.runtime.generation import GenerationOptions
    from qwen2vl_edge.server.batcher import Batcher, Job
    from qwen2vl_edge.server.metrics import Metrics
    from qwen2vl_edge.server.sessions import job_keys

    conversation = [SYSTEM, {"role": "user", "content": [{"type": "image", "image": Image.open(images["c"])},
                                                         {"type": "text", "text": "Describe it."}]}]

    def kept(max_session_bytes):
        async def answer():
            prefix_key, starts = job_keys(conversation, GenerationOptions())
            job = Job(conversation, GenerationOptions(max_new_tokens=MAX_TOKENS), asyncio.get_running_loop(),
                      stream=False, prefix_key=prefix_key, starts=starts)
            batcher.submit(job)
            return await job.events.get()

        metrics = Metrics()
        batcher = Batcher(pipe, 8, 8, 0.0, metrics, max_sessions=4, max_session_bytes=max_session_bytes)
        try:
            kind, _ = asyncio.run(answer())
        finally:
            batcher.close()  # after the worker has kept the session (it does once it has posted the result)
        assert kind == "done"
        sessions = [k.session for k in batcher.sessions._kept.values()]
        return sessions, batcher.sessions.nbytes, metric(metrics.exposition().decode(), "qwen2vl_kept_session_bytes")

    sessions, nbytes, gauge = kept(None)
    assert len(sessions) == 1 and nbytes == sessions[0].cache_bytes > 0 and gauge == nbytes
    sessions, nbytes, gauge = kept(nbytes - 1)
    assert sessions == [] and nbytes == gauge == 0


# -- kept sessions: a request that continues a conversation reuses its KV cache ------------------------------


# Replies of the tiny random model are random tokens, which often do not re-tokenise to themselves; a
# session is kept only when they do (see server/sessions.py). These conversations' replies do.
SYSTEM = {"role": "system", "content": "You look at pictures."}


def _turn(client, model, messages, **options):
    options = {"max_tokens": MAX_TOKENS, "temperature": 0, **options}
    reply = client.chat.completions.create(model=model, messages=messages, **options)
    details = reply.usage.prompt_tokens_details
    return reply, (details.cached_tokens or 0) if details else 0


def _runtime_chat(messages: list[dict], path: Path) -> list[dict]:
    """The conversation for pipe.generate: image parts as the file they were encoded from."""
    def part(p):
        return {"type": "image", "image": str(path)} if p["type"] == "image_url" else p
    return [{**m, "content": m["content"] if isinstance(m["content"], str) else [part(p) for p in m["content"]]}
            for m in messages]


def test_a_continued_conversation_reuses_the_cache_and_equals_a_fresh_run(client, model, server, pipe, images):
    """Three turns through the server: each follow-up reports the previous turns as cached prompt tokens and
    gets the reply pipe.generate gives for the whole conversation (greedy, then sampled with a seed)."""
    before = metric(get(f"{server.url}/metrics")[2], "qwen2vl_cached_prompt_tokens_total")
    messages = [SYSTEM] + image_chat(data_uri(images["c"]), "Describe it.")
    held, cached_sum = 0, 0
    for i, (question, options) in enumerate([(None, {}), ("Tell me more.", {}),
                                             ("And the colours?", {"temperature": 0.8, "seed": 5})]):
        if question:
            messages.append({"role": "user", "content": question})
        reply, cached = _turn(client, model, messages, **options)
        sampling = {"do_sample": True, "temperature": 0.8, "seed": 5} if options else {}
        expected = pipe.generate(_runtime_chat(messages, images["c"]), max_new_tokens=MAX_TOKENS, **sampling)
        text = reply.choices[0].message.content
        assert text == expected.text, i
        assert reply.usage.prompt_tokens == expected.usage["prompt_tokens"], i
        assert len(set(expected.token_ids)) >= MAX_TOKENS // 2, i  # varied: the comparison means something
        if i:  # the previous prompt and its reply came from the cache, but the reply's last token: it went in
            # with this turn's prefill, with the template's end of turn
            assert cached == held - 1 and cached < reply.usage.prompt_tokens, (i, held, cached)
        else:
            assert cached == 0
        held, cached_sum = reply.usage.prompt_tokens + reply.usage.completion_tokens, cached_sum + cached
        messages.append({"role": "assistant", "content": text})
    after = metric(get(f"{server.url}/metrics")[2], "qwen2vl_cached_prompt_tokens_total")
    assert after - before == cached_sum


def test_an_edited_or_doubly_continued_conversation_runs_afresh(client, model, pipe, images):
    """A conversation whose earlier message changed reuses nothing; two clients continuing the same history
    at once: one takes the kept session, the other runs afresh, and both get the fresh run's reply."""
    start = [SYSTEM] + image_chat(data_uri(images["b"]), "Look.")
    first, _ = _turn(client, model, start)
    history = start + [{"role": "assistant", "content": first.choices[0].message.content}]
    edited = [SYSTEM, {"role": "user", "content": [start[1]["content"][0], {"type": "text", "text": "Look!"}]},
              history[2], {"role": "user", "content": "Why?"}]
    reply, cached = _turn(client, model, edited)
    assert cached == 0
    assert reply.choices[0].message.content == pipe.generate(_runtime_chat(edited, images["b"]),
                                                             max_new_tokens=MAX_TOKENS).text
    follow_ups = [history + [{"role": "user", "content": q}] for q in ("Why?", "Where?")]
    answers: dict[int, tuple] = {}
    threads = [threading.Thread(target=lambda i: answers.__setitem__(i, _turn(client, model, follow_ups[i])),
                                args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(cached > 0 for _, cached in answers.values()) == [False, True]
    for i, (reply, _) in answers.items():
        expected = pipe.generate(_runtime_chat(follow_ups[i], images["b"]), max_new_tokens=MAX_TOKENS)
        assert reply.choices[0].message.content == expected.text, i


def test_a_continuation_over_the_context_gets_the_runtime_error_and_the_server_goes_on(client, model, pipe,
                                                                                       images):
    """The kept session refuses a turn that would overflow the context: the request runs afresh and gets the
    runtime's context error, as without sessions; the conversation then continues."""
    start = [SYSTEM] + image_chat(data_uri(images["c"]), "Tell me.")
    first, _ = _turn(client, model, start)
    history = start + [{"role": "assistant", "content": first.choices[0].message.content}]
    follow_up = history + [{"role": "user", "content": "More."}]
    context = pipe.artifact.config.text.max_position_embeddings
    status, body = _status_of(lambda: _turn(client, model, follow_up, max_tokens=context - 20))
    assert status == 400 and "exceeds the model's context" in body["message"], body
    reply, cached = _turn(client, model, follow_up)
    assert cached == 0  # the refused turn dropped the session
    assert reply.choices[0].message.content == pipe.generate(_runtime_chat(follow_up, images["c"]),
                                                             max_new_tokens=MAX_TOKENS).text
