"""`qwen2vl-edge` command line: sits above runtime/ and export/, imports each lazily."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from qwen2vl_edge.runtime.backends.trt_profiles import MIN_TENSORRT, PRECISIONS
from qwen2vl_edge.runtime.config import FAMILIES


def _make_tiny(args: argparse.Namespace) -> int:
    from qwen2vl_edge.export.tiny import make_tiny

    out = make_tiny(args.dir, seed=args.seed, layout=args.layout, overrides=args.set, family=args.family)
    print(f"tiny {args.family} checkpoint written to {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from qwen2vl_edge.export.onnx_export import export

    try:
        export(args.checkpoint, args.out, dtype=args.dtype, opset=args.opset, all_logits=args.all_logits,
               target=args.target, weights=args.weights, vision_weights=args.vision_weights,
               block_size=args.block_size, accuracy_level=args.accuracy_level, precision=args.precision,
               min_tensorrt=args.min_tensorrt, max_context=args.max_context)
    except ValueError as e:  # the export's option checks: bad usage, exit 2
        raise UsageError(str(e)) from None
    return 0


class UsageError(Exception):
    """Flags that contradict each other or lack a partner: exit 2, as argparse does."""


def _read(path: str, what: str) -> str:
    """A file's text, or standard input for '-'."""
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{what}: could not read {path}: {e}") from None


def _vision_options(args: argparse.Namespace, kind: str) -> dict:
    """--min-pixels/--max-pixels for every image and video given on the command line, --fps/--nframes for videos."""
    names = ("min_pixels", "max_pixels") + (("fps", "nframes") if kind == "video" else ())
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


def _user_content(args: argparse.Namespace, images, videos, text: str | None) -> list:
    content = [{"type": "image", "image": p, **_vision_options(args, "image")} for p in images or []]
    content += [{"type": "video", "video": p, **_vision_options(args, "video")} for p in videos or []]
    if text is not None:
        content.append({"type": "text", "text": text})
    return content


def _conversation_from_args(args: argparse.Namespace) -> list:
    if args.messages:
        if args.prompt is not None or args.image or args.video or args.system:
            raise UsageError("--messages holds the whole conversation: do not combine it with --prompt, --image, "
                             "--video or --system (put them in the messages)")
        try:
            return json.loads(_read(args.messages, "--messages"))
        except json.JSONDecodeError as e:
            raise UsageError(f"--messages {args.messages} is not valid JSON: {e}") from None
    if args.prompt is None:
        raise UsageError("give --messages FILE.json, or --prompt TEXT (with optional --image/--video); '-' reads "
                         "standard input")
    prompt = _read("-", "--prompt").rstrip("\n") if args.prompt == "-" else args.prompt
    system = [{"role": "system", "content": args.system}] if args.system else []
    return system + [{"role": "user", "content": _user_content(args, args.image, args.video, prompt)}]


def _generation_options(args: argparse.Namespace) -> dict:
    """--temperature 0 or --greedy: greedy. --temperature > 0, --top-p or --top-k: sampling. Without either, the
    checkpoint's generation_config.json decides, as in transformers; so does every sampling field the command
    line leaves out (then transformers' defaults: temperature 1.0, top-k 50, top-p 1.0). Greedy with a sampling
    flag, or --seed without a sampling flag, is a contradiction: an error, not a flag silently ignored."""
    sampling_flags = [f for f, v in (("--top-p", args.top_p), ("--top-k", args.top_k)) if v is not None]
    greedy = args.greedy or args.temperature == 0
    if greedy and (sampling_flags or args.temperature):
        flags = sampling_flags + (["--temperature"] if args.temperature else [])
        greedy_flag = "--greedy" if args.greedy else "--temperature 0"
        raise UsageError(f"sampling flags ({', '.join(flags)}) contradict {greedy_flag}, which asks for greedy "
                         "decoding: choose one")
    sampling = args.temperature is not None or bool(sampling_flags)
    if args.seed is not None and (greedy or not sampling):
        raise UsageError("--seed only matters when sampling: add --temperature T, --top-p or --top-k")
    return dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                do_sample=False if greedy else (True if sampling else None),
                temperature=None if greedy else args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop)


def _json_arg(value: str, flag: str):
    """A flag's JSON: inline when it starts like JSON, else the file (or '-': standard input) holding it."""
    text = value if value.lstrip()[:1] in ("{", "[") else _read(value, flag)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{flag}: {value} is not valid JSON: {e}") from None


def _agent_options(args: argparse.Namespace) -> dict:
    """--json-schema, --regex, --grammar, --tools, --tool-choice -> generate()'s structured-output options."""
    given = [f for f, v in (("--json-schema", args.json_schema), ("--regex", args.regex), ("--grammar", args.grammar),
                            ("--tools", args.tools)) if v is not None]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} each constrain the whole reply: give one")
    if args.tool_choice is not None and args.tools is None:
        raise UsageError("--tool-choice needs --tools FILE")
    options: dict = {}
    if args.json_schema is not None:
        options["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "reply", "schema": _json_arg(args.json_schema, "--json-schema"), "strict": True}}
    if args.regex is not None:
        options["regex"] = args.regex
    if args.grammar is not None:
        options["grammar"] = _read(args.grammar, "--grammar")
    if args.tools is not None:
        choice = args.tool_choice or "auto"
        options.update(tools=_json_arg(args.tools, "--tools"), parallel_tool_calls=not args.no_parallel_tool_calls,
                       tool_choice=choice if choice in ("auto", "none", "required") else
                       {"type": "function", "function": {"name": choice}})
    return options


def _load(args: argparse.Namespace):
    from qwen2vl_edge.runtime import Qwen2VLPipeline

    return Qwen2VLPipeline.load(args.artifact, backend=args.backend, num_threads=args.threads,
                                verify=not args.no_verify, session_cache=args.session_cache,
                                tool_format=args.tool_format)


def _print_calls(result) -> None:
    """A reply's tool calls after its text, one JSON object a line (OpenAI's shape)."""
    for call in result.tool_calls:
        print(json.dumps(call.to_openai(), ensure_ascii=False))


def _run(args: argparse.Namespace) -> int:
    from qwen2vl_edge.runtime.processor import is_batch

    conversation = _conversation_from_args(args)  # flags first: a usage error never waits for the model
    options = dict(_generation_options(args), add_vision_id=args.add_vision_id, **_agent_options(args))
    pipe = _load(args)
    if args.json or is_batch(conversation):
        results = pipe.generate(conversation, **options)
        results = results if isinstance(results, list) else [results]
        payload = [r.to_dict() for r in results]
        print(json.dumps(payload if len(payload) > 1 else payload[0], indent=2 if not args.json else None))
    else:
        _print_stream(pipe.stream(conversation, **options))
        _print_calls(pipe.last_result)
    return 0


def _print_stream(pieces) -> None:
    for piece in pieces:
        _interrupt.check()
        print(piece, end="", flush=True)
    print()


CHAT_COMMANDS = {
    "/image PATH": "attach an image file or URL to your next message (repeatable)",
    "/video PATH": "attach a video file or URL to your next message (repeatable)",
    "/result TEXT": "answer each tool call of the last reply with TEXT",
    "/reset": "forget the conversation (the system message stays)",
    "/help": "show these commands",
    "/quit": "leave (so does end of input, Ctrl-D)",
}
CHAT_HELP = "\n".join(f"  {command:<12} {what}" for command, what in CHAT_COMMANDS.items())
PROMPT = "> "  # on stderr, as Python's own prompt: standard output holds the replies only


def _chat_lines():
    """The user's lines, each read after the prompt is shown; ends at end of input."""
    while True:
        _interrupt.check()
        print(PROMPT, end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            print(file=sys.stderr)  # end the prompt's line
            return
        yield line.strip()


def _chat(args: argparse.Namespace) -> int:
    """An interactive session: the KV cache is kept between turns, so follow-ups start at once. A turn's
    InputError is reported and the session goes on; anything else ends it through main()."""
    from qwen2vl_edge.runtime.errors import InputError

    options = dict(_generation_options(args), **_agent_options(args))  # flags first: no wait for the model
    session = _load(args).chat(system=args.system, overflow=args.overflow, add_vision_id=args.add_vision_id,
                               **options)
    print("Type a message and press Enter; /help lists the commands.", file=sys.stderr)
    attached: dict[str, list] = {"image": [], "video": []}
    for line in _chat_lines():
        command, _, rest = line.partition(" ")
        if command == "/quit":
            break
        if command == "/help":
            print(CHAT_HELP, file=sys.stderr)
        elif command == "/reset":
            session.reset()
            attached = {"image": [], "video": []}
        elif command in ("/image", "/video") and rest:
            attached[command[1:]].append(rest.strip())
        elif line:
            calls = session.last_result.tool_calls if session.last_result and command == "/result" else []
            turn = ({"tool_results": [{"tool_call_id": c.id, "content": rest} for c in calls]} if calls else
                    {"content": _user_content(args, attached["image"], attached["video"], line)})
            try:
                _print_stream(session.stream(**turn))
                _print_calls(session.last_result)
                usage, cached = session.last_result.usage, session.last_result.usage["cached_prompt_tokens"]
                print(f"[{cached} cached + {usage['prompt_tokens'] - cached} new prompt tokens, "
                      f"{session.last_result.timings['time_to_first_token']:.2f} s to first token]", file=sys.stderr)
            except InputError as e:
                print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            attached = {"image": [], "video": []}
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from qwen2vl_edge.export.quickstart import quickstart

    return quickstart(Path(args.dir))


def _check_trt(args: argparse.Namespace) -> int:
    from qwen2vl_edge.export.trt_check import main as check_main

    return check_main(args.artifact, args.trt_version)


def _build_trt(args: argparse.Namespace) -> int:
    from qwen2vl_edge.export.trt_build import build_trt
    from qwen2vl_edge.runtime.backends.trt_profiles import Limits

    limits = Limits(max_image_tokens=args.max_image_tokens, min_image_tokens=args.min_image_tokens,
                    max_frames=args.max_frames, max_prompt=args.max_prompt,
                    max_context=args.max_context or Limits.max_context, max_batch=args.max_batch)
    build_trt(args.artifact, limits=limits, workspace_gb=args.workspace_gb, timing_cache=args.timing_cache,
              verify=not args.no_verify, detailed=args.detailed_layers,  # BuildError / ArtifactError: main() prints
              fit_context=args.max_context is None)  # 10.15 graphs: their static cache length
    return 0


def _gpu_check(args: argparse.Namespace) -> int:
    from qwen2vl_edge.benchmarks.gpu_check import gpu_check

    return gpu_check(Path(args.out), models=args.models.split(","), new_tokens=args.new_tokens)


def _bench(args: argparse.Namespace) -> int:
    from qwen2vl_edge.benchmarks.bench import run_bench

    ints = lambda text: [int(x) for x in text.split(",")] if text else None  # noqa: E731
    if args.quick:
        args.model, args.repeats, args.new_tokens = "tiny", 1, 8
    from qwen2vl_edge.benchmarks.bench import DEFAULT_SYSTEMS

    run_bench(args.model, args.systems or DEFAULT_SYSTEMS, args.layers, args.threads, args.new_tokens, args.repeats, Path(args.out),
              quick=args.quick, resolutions=ints(args.resolutions), contexts=ints(args.contexts),
              decode_processes=0 if args.quick and args.decode_processes is None else
              (5 if args.decode_processes is None else args.decode_processes),
              peers_dir=args.peers_dir)
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        from qwen2vl_edge.server import Limits, ServerSettings
    except ImportError as e:
        raise SystemExit(f"serve needs the [serve] extra: pip install '.[serve]' in a clone of the repository "
                         f"(or the wheel with [serve]) ({e})") from None

    if args.max_sessions < 0:
        raise UsageError(f"--max-sessions must be 0 (keep none) or more, got {args.max_sessions}")
    if args.max_session_mb < 0:
        raise UsageError(f"--max-session-mb must be 0 (no bound) or more, got {args.max_session_mb}")
    limits = Limits(max_body_bytes=args.max_body_mb * 2**20, max_image_bytes=args.max_image_mb * 2**20,
                    max_image_pixels=args.max_image_pixels, default_max_tokens=args.default_max_tokens,
                    max_queue=args.max_queue)
    settings = ServerSettings(artifact=Path(args.artifact), backend=args.backend, threads=args.threads,
                              session_cache=args.session_cache, verify=not args.no_verify, model_name=args.model_name,
                              max_batch=args.max_batch, max_sessions=args.max_sessions,
                              max_session_bytes=args.max_session_mb * 2**20 or None, api_key=args.api_key,
                              allowed_media_dir=Path(args.allowed_media_dir) if args.allowed_media_dir else None,
                              tool_format=args.tool_format, limits=limits)
    if args.ray:
        try:
            from qwen2vl_edge.server.ray_serve import run_forever
        except ImportError as e:
            raise SystemExit(f"serve --ray needs the [ray] extra: pip install '.[ray]' in a clone of the "
                             f"repository (or the wheel with [ray]) ({e})") from None
        run_forever(settings, args.replicas, args.host, args.port, args.ray_address, args.cpus_per_replica,
                    args.gpus_per_replica)
        return 0
    from qwen2vl_edge.server.app import run_uvicorn

    run_uvicorn(settings, args.host, args.port, args.log_level, args.graceful_timeout)
    return 0


def _bench_serve(args: argparse.Namespace) -> int:
    from qwen2vl_edge.benchmarks.serve_bench import SETUPS, run_bench_serve

    setups = args.setups.split(",")
    unknown = [s for s in setups if s not in SETUPS]
    if unknown:
        raise SystemExit(f"bench-serve: unknown setup(s) {', '.join(unknown)}; known: {', '.join(SETUPS)}")
    run_bench_serve(args.model, args.variant, [int(c) for c in args.concurrency.split(",")], args.requests_per_client,
                    args.new_tokens, args.image_side, args.threads, args.max_batch, setups, Path(args.out))
    return 0


def _add_serve_parser(sub) -> None:
    p = _command(sub, "serve", "OpenAI-compatible HTTP server (needs [serve]; --ray needs [ray])")
    p.add_argument("artifact", help=ARTIFACT_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    _load_flags(p)
    p.add_argument("--model-name", help="the model id clients send (default: the artifact folder's name)")
    p.add_argument("--max-batch", type=int, default=8, help="requests run together as one left-padded batch")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests; more are answered 503")
    p.add_argument("--max-sessions", type=int, default=8,
                   help="chat sessions kept, each with its KV cache, so that a request continuing a conversation "
                        "prefills only its new message; 0 keeps none")
    p.add_argument("--max-session-mb", type=int, default=2048,
                   help="what the kept sessions' KV caches may hold in all (MiB; the least recently used go "
                        "first); 0: no bound but --max-sessions")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--allowed-media-dir", help="accept local image/video paths under this folder only")
    p.add_argument("--max-body-mb", type=int, default=32, help="request body size (MiB); larger ones get a 413")
    p.add_argument("--max-image-mb", type=int, default=16, help="per encoded image or video frame")
    p.add_argument("--max-image-pixels", type=int, default=16_777_216, help="per decoded image (width x height)")
    p.add_argument("--default-max-tokens", type=int, default=256, help="when a request names none")
    p.add_argument("--log-level", default="info", help="uvicorn's log level: critical, error, warning, info, "
                                                          "debug or trace")
    p.add_argument("--graceful-timeout", type=float, default=10.0,
                   help="on SIGTERM/Ctrl-C, seconds uvicorn waits for open connections (requests in flight "
                        "are answered 503 at their next token)")
    p.add_argument("--ray", action="store_true", help="serve the same app with Ray Serve replicas (needs [ray])")
    p.add_argument("--replicas", type=int, default=2, help="Ray Serve replicas, each with its own pipeline")
    p.add_argument("--ray-address", help="join this Ray cluster (e.g. 'auto' on a cluster node); default: start one")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs reserved by each replica")
    p.add_argument("--gpus-per-replica", type=float, default=0.0,
                   help="Ray GPUs reserved by each replica (1: one replica per GPU, which Ray makes its only "
                        "visible one)")
    p.set_defaults(func=_serve)

    p = _command(sub, "bench-serve", "the server under 1/4/8 concurrent clients: one process vs Ray replicas")
    p.add_argument("--model", default="tiny",
                   help="tiny | 2b-shape | 7b-shape | qwen25vl-3b-shape | qwen3vl-2b-shape | CHECKPOINT_DIR")
    p.add_argument("--variant", default="fp32", help="artifact variant: fp32 | fp16 | int8 | int4 | int4-vdq")
    p.add_argument("--setups", default="one-process,one-process-half-threads,ray-2-replicas",
                   help="comma list of server set-ups to measure")
    p.add_argument("--concurrency", default="1,4,8", help="comma list of concurrent clients")
    p.add_argument("--requests-per-client", type=int, default=4, help="requests each client sends")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--image-side", type=int, default=224, help="side of the square image in each request")
    p.add_argument("--threads", type=int, default=2, help="threads of the one process; split over the replicas")
    p.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch")
    p.add_argument("--out", default="bench-serve-out", help="folder for report.md and result.json")
    p.set_defaults(func=_bench_serve)


def _generation_flags(p: argparse.ArgumentParser) -> None:
    """The flags `run` and `chat` share. Sampling flags left out take the checkpoint's generation_config.json
    values (see _generation_options)."""
    p.add_argument("--system", help="system message")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated at most")
    p.add_argument("--min-new-tokens", type=int, default=0, help="tokens generated before an end token may end "
                                                                  "the reply")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (also the default, unless a sampling flag "
                                                         "is given or the checkpoint's generation_config.json samples)")
    p.add_argument("--temperature", type=float, help="0: greedy; > 0: sampling at this temperature")
    p.add_argument("--top-p", type=float, help="sampling from the smallest set of tokens holding this mass")
    p.add_argument("--top-k", type=int, help="sampling from the k likeliest tokens (0: all)")
    p.add_argument("--seed", type=int, help="seed of the sampler (needs a sampling flag)")
    p.add_argument("--repetition-penalty", type=float, help="default: the checkpoint's, else 1.0 (none)")
    p.add_argument("--stop", action="append", help="end the reply before this text (repeatable)")
    p.add_argument("--min-pixels", type=int, help="per image / video frame: at least this many pixels")
    p.add_argument("--max-pixels", type=int, help="per image / video frame: at most this many pixels")
    fps = p.add_mutually_exclusive_group()
    fps.add_argument("--fps", type=float, help="video frames sampled per second (default 2)")
    fps.add_argument("--nframes", type=int, help="video frames sampled in all")
    p.add_argument("--add-vision-id", action="store_true", help="label images 'Picture 1:', videos 'Video 1:'")
    _load_flags(p)
    _agent_flags(p)


def _load_flags(p: argparse.ArgumentParser) -> None:
    """How the pipeline is loaded: the flags `run`, `chat` and `serve` share."""
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime",
                   help="onnxruntime: the artifact's ONNX graphs; tensorrt: engines made by build-trt")
    p.add_argument("--threads", type=int, help="ONNX Runtime's threads per graph (default: one per core)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the artifact files")
    p.add_argument("--session-cache", metavar="DIR",
                   help="keep ONNX Runtime's optimized graphs and CPU-packed weights in DIR: later starts are "
                        "faster (first start writes about the artifact's size again, twice for quantized weights)")
    p.add_argument("--tool-format", choices=["qwen", "hermes"], default=None,
                   help="how tools and calls are written: qwen (Qwen2-VL's ✿FUNCTION✿, Qwen-Agent) or hermes "
                        "(<tool_call> JSON, Qwen2.5-VL's and Qwen3-VL's) (default: the family's own: qwen for "
                        "Qwen2-VL and Qwen2.5-VL, hermes for Qwen3-VL)")


def _agent_flags(p: argparse.ArgumentParser) -> None:
    """Structured output and tools (need the [agents] extra); docs/agents.md."""
    p.add_argument("--json-schema", metavar="FILE|JSON",
                   help="the reply is JSON following this schema (a file, '-', or inline JSON; default: free text)")
    p.add_argument("--regex", help="the reply matches this regular expression (default: free text)")
    p.add_argument("--grammar", metavar="FILE", help="the reply follows this Lark grammar (default: free text)")
    p.add_argument("--tools", metavar="FILE|JSON",
                   help="OpenAI function tools the model may call, a JSON list (default: none); calls print as "
                        "JSON lines after the text, or in --json's tool_calls")
    p.add_argument("--tool-choice", metavar="auto|none|required|NAME",
                   help="auto: calls when the model starts one; required: a call; NAME: that function; none: no "
                        "call (default: auto)")
    p.add_argument("--no-parallel-tool-calls", action="store_true",
                   help="at most one call per reply (default: several allowed)")


DESCRIPTION = """\
Run Qwen2-VL vision-language models on edge devices: export a checkpoint to ONNX once (on a machine with
torch), then answer questions about images, video and text with a lean runtime that needs no torch: one
reply (run), an interactive chat (chat), or an OpenAI-compatible server (serve). TensorRT engines for
NVIDIA GPUs and Jetson are built from the export on the device (build-trt)."""

EPILOG = "Start with `qwen2vl-edge quickstart`; `qwen2vl-edge COMMAND --help` lists a command's flags."
ARTIFACT_HELP = "artifact directory written by `qwen2vl-edge export`"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's help ends with its default, where it has one to show (a switch's False and an unset None
    say nothing: their help says what happens without them)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        shown = action.default not in (None, False, [], argparse.SUPPRESS) and action.option_strings
        return f"{help_text} (default: %(default)s)" if shown and "%(default)" not in help_text else help_text


def _command(sub, name: str, summary: str) -> argparse.ArgumentParser:
    """A subcommand whose --help opens with the summary the command list shows."""
    return sub.add_parser(name, help=summary, description=summary, formatter_class=HelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen2vl-edge", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "make-tiny", "write a tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint (needs [export])")
    p.add_argument("dir", help="folder to write the checkpoint to")
    p.add_argument("--family", choices=list(FAMILIES), default="qwen2_vl", help="model family")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--layout", choices=["original", "v5"], default="original",
                   help="config.json layout: Qwen2-VL-2B-Instruct's own, or transformers 5's")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. text.num_hidden_layers=3, vision.depth=1, tie_word_embeddings=false")
    p.set_defaults(func=_make_tiny)

    p = _command(sub, "export", "checkpoint -> ONNX artifact directory (needs [export])")
    p.add_argument("checkpoint", help="a Qwen2-VL checkpoint dir: float, GPTQ or AWQ (GEMM), read from its config")
    p.add_argument("out", help="artifact directory to write")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="float type of the portable graphs")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset of the graphs")
    p.add_argument("--all-logits", action="store_true",
                   help="decoder returns logits for every position (default: last position only)")
    p.add_argument("--target", choices=["portable", "ort-cpu", "tensorrt"], default="portable",
                   help="portable: standard ONNX (any runtime); ort-cpu: ONNX Runtime CPU kernels; tensorrt: "
                        "strongly typed standard ONNX for TensorRT's parser (--precision, --min-tensorrt)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="tensorrt: type of weights, activations and KV cache (default fp16)")
    p.add_argument("--min-tensorrt", choices=MIN_TENSORRT, default=None,
                   help="tensorrt: oldest TensorRT the graphs are written for (default 10.3, JetPack 6; 10.15: fused "
                        "Attention, KV cache updated in place)")
    p.add_argument("--max-context", type=int, default=None,
                   help="tensorrt --min-tensorrt 10.15: the KV cache's fixed length, which every request allocates "
                        "whole and decode reads whole (default: min(4096, the model's context)); build-trt builds "
                        "at it")
    p.add_argument("--weights", choices=["fp32", "int8", "int4"], default="fp32",
                   help="decoder weights (ort-cpu); every linear layer (tensorrt: int4 or fp32 only, TensorRT keeps "
                        "no weight-only int8); of a GPTQ/AWQ checkpoint only its float lm_head on ort-cpu (its own "
                        "quantized layers are kept as they are)")
    p.add_argument("--vision-weights", choices=["fp32", "int8", "int4", "int8-dynamic"], default=None,
                   help="int8/int4: MatMulNBits blocks; int8-dynamic: per-channel int8 weights with activations "
                        "quantized per tensor at run time (faster vision, coarser activations). Default: fp32 "
                        "(ort-cpu), --weights (tensorrt)")
    p.add_argument("--block-size", type=int, default=None,
                   help="quantization block along the input channels (default: int4 on ort-cpu 128, or the "
                        "largest power of two that divides a linear's input size; otherwise 32)")
    p.add_argument("--accuracy-level", type=int, default=4, help="MatMulNBits accuracy_level (4: int8 activations)")
    p.set_defaults(func=_export)

    p = _command(sub, "run", "generate from an artifact directory (no torch needed)")
    p.add_argument("artifact", help=ARTIFACT_HELP)
    p.add_argument("--messages", help="JSON file ('-': standard input): one conversation or a list of them")
    p.add_argument("--image", action="append", help="an image file or http(s) URL (repeatable)")
    p.add_argument("--video", action="append", help="a file path or http(s) URL (needs [video])")
    p.add_argument("--prompt", help="the user's text; '-' reads it from standard input")
    _generation_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text "
                                                       "(text, token_ids, boxes, video_timestamps, timings, usage)")
    p.set_defaults(func=_run)

    p = _command(sub, "chat", "interactive chat that keeps the KV cache between turns (no torch needed); "
                              "/help in the chat lists its commands")
    p.add_argument("artifact", help=ARTIFACT_HELP)
    p.add_argument("--overflow", choices=["error", "slide"], default="error",
                   help="when the context is full: report it, or start over from the latest turns")
    _generation_flags(p)
    p.set_defaults(func=_chat)

    p = _command(sub, "quickstart", "tiny checkpoint -> export -> multi-image chat -> parity check")
    p.add_argument("--dir", default="qwen2vl-edge-quickstart", help="folder for the checkpoint and the artifact")
    p.set_defaults(func=_quickstart)

    p = _command(sub, "build-trt", "compile a --target tensorrt artifact's graphs into TensorRT engines "
                                   "(on the device; precision and KV layout come from the export)")
    p.add_argument("artifact", help="artifact directory of an `export --target tensorrt`")
    p.add_argument("--max-image-tokens", type=int, default=1280, help="merged tokens per image / video frame pair")
    p.add_argument("--min-image-tokens", type=int, default=4, help="merged tokens of the smallest image")
    p.add_argument("--max-frames", type=int, default=16, help="video frames per encoder call")
    p.add_argument("--max-prompt", type=int, default=2048, help="prompt tokens per request")
    p.add_argument("--max-context", type=int, default=None,
                   help="prompt + generated tokens per request (default: the export's --max-context for 10.15 "
                        "graphs, whose KV cache length is fixed; else 4096)")
    p.add_argument("--max-batch", type=int, default=1, help="conversations per batch")
    p.add_argument("--workspace-gb", type=float, default=4.0, help="GPU memory TensorRT's builder may use (GiB)")
    p.add_argument("--timing-cache", help="timing cache file to reuse across builds (default: one per GPU and "
                                          "TensorRT version under ~/.cache/qwen2vl-edge/tensorrt/)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the artifact files")
    p.add_argument("--detailed-layers", action="store_true", help="build with ProfilingVerbosity.DETAILED, so that "
                   "the engine inspector (gpu-check, trtexec --dumpLayerInfo) reports each layer's kernel and types")
    p.set_defaults(func=_build_trt)

    p = _command(sub, "gpu-check", "on a machine with a GPU and TensorRT: build engines for the tiny and "
                                   "2B-shape checkpoints, record their layers (fused attention, int4 weights, "
                                   "device memory), compare greedy tokens with ONNX Runtime, benchmark")
    p.add_argument("--out", default="benchmarks/results/gpu-check", help="folder for the report and results")
    p.add_argument("--models", default="tiny,2b-shape", help="comma list of checkpoints to check")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request")
    p.set_defaults(func=_gpu_check)

    p = _command(sub, "bench", "latency, throughput and memory side by side with transformers")
    p.add_argument("--model", default="tiny",
                   help="tiny | 2b-shape | 7b-shape | qwen25vl-3b-shape | qwen3vl-2b-shape | CHECKPOINT_DIR")
    p.add_argument("--layers", type=int, help="text decoder depth for quicker runs (shapes only)")
    p.add_argument("--systems", default=None,
                   help="comma list (default: all but ours-ort-int4-vdq, ours-ort-int4-b256, the TensorRT ones, "
                        "ours-trt-fp16 and "
                        "ours-trt-int4, and the peers, openvino-int4 and llamacpp-q4km; see SYSTEMS in "
                        "benchmarks/bench.py)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of every system")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement (the median is reported)")
    p.add_argument("--resolutions", help="comma list of square image sides for the TTFT sweep")
    p.add_argument("--contexts", help="comma list of prompt lengths for the decode sweep")
    p.add_argument("--out", default="bench-out", help="folder for report.md, result.json and the plots")
    p.add_argument("--quick", action="store_true", help="tiny model, one repeat: a smoke run (CI)")
    p.add_argument("--decode-processes", type=int, default=None,
                   help="also measure decode tok/s in N fresh processes per system and report their spread "
                        "(default 5; 0 with --quick)")
    p.add_argument("--peers-dir", help="where benchmarks/peers/setup_*.sh installed the peers (openvino-int4, "
                   "llamacpp-q4km); default $QWEN2VL_EDGE_PEERS or ~/.cache/qwen2vl-edge/peers")
    p.set_defaults(func=_bench)

    p = _command(sub, "check-trt", "check that an artifact's graphs fit TensorRT's ONNX parser (CPU only)")
    p.add_argument("artifact", help="artifact directory of an `export --target tensorrt`")
    p.add_argument("--trt-version", default=None,
                   help="TensorRT version whose operator matrix applies (default: the artifact's --min-tensorrt)")
    p.set_defaults(func=_check_trt)
    _add_serve_parser(sub)
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    return parser


class _Interrupt:
    """SIGINT (Ctrl-C) stops every command at once, with exit status 130.

    Python turns SIGINT into KeyboardInterrupt only when the process starts with SIGINT at its default: one
    started with it ignored (a script's background job, `sh -c 'cmd &'`, some CI runners) ignored Ctrl-C and
    ran a generation to its last token. So the handler is installed whatever was inherited. It also records
    the signal: Python drops an exception raised inside a finalizer (a weakref callback freeing TensorRT
    buffers, a generator closed by the garbage collector), so the loops `check` between pieces and lines."""

    def __init__(self):
        self.received = False

    def __call__(self, signum, frame):
        self.received = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.received:
            raise KeyboardInterrupt


_interrupt = _Interrupt()


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 an unexpected error, 2 bad input or usage, 130 interrupted (Ctrl-C), 141 the
    reader of standard output went away (`| head`): the codes a shell shows for SIGINT and SIGPIPE."""
    args = None
    _interrupt.received = False
    previous = signal.signal(signal.SIGINT, _interrupt)
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)  # end the line the ^C was echoed on
        return 130
    except BrokenPipeError:
        _detach_stdout()
        return 141
    except Exception as e:  # noqa: BLE001 (the one place that turns any error into one line)
        if getattr(args, "debug", False):
            raise
        return _report(e)
    finally:
        signal.signal(signal.SIGINT, previous)


def _report(error: Exception) -> int:
    from qwen2vl_edge.runtime.errors import ArtifactError, ConfigError, InputError

    message = " ".join(str(error).split())  # one line
    if isinstance(error, (InputError, ArtifactError, ConfigError, UsageError)):  # they name the fix
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(f"error: {type(error).__name__}: {message}\nrerun with --debug for the traceback", file=sys.stderr)
    return 1


def _detach_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush does not fail again on exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
