"""`qwen2vl-edge` command line: sits above runtime/ and export/, imports each lazily."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _make_tiny(args: argparse.Namespace) -> int:
    from qwen2vl_edge.export.tiny import make_tiny

    out = make_tiny(args.dir, seed=args.seed, layout=args.layout, overrides=args.set)
    print(f"tiny Qwen2-VL checkpoint written to {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from qwen2vl_edge.export.onnx_export import export

    export(args.checkpoint, args.out, dtype=args.dtype, opset=args.opset, all_logits=args.all_logits,
           target=args.target, weights=args.weights, vision_weights=args.vision_weights, block_size=args.block_size,
           accuracy_level=args.accuracy_level)
    return 0


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
        return json.loads(Path(args.messages).read_text())
    if args.prompt is None:
        raise SystemExit("run: give --messages FILE.json, or --prompt TEXT (with optional --image/--video)")
    system = [{"role": "system", "content": args.system}] if args.system else []
    return system + [{"role": "user", "content": _user_content(args, args.image, args.video, args.prompt)}]


def _generation_options(args: argparse.Namespace) -> dict:
    """Sampling flags left out take the checkpoint's generation_config.json values."""
    do_sample = False if args.greedy else (True if args.temperature is not None else None)
    return dict(max_new_tokens=args.max_new_tokens, do_sample=do_sample, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                stop=args.stop)


def _load(args: argparse.Namespace):
    from qwen2vl_edge.runtime import Qwen2VLPipeline

    return Qwen2VLPipeline.load(args.artifact, backend=args.backend, num_threads=args.threads,
                                verify=not args.no_verify, session_cache=args.session_cache)


def _run(args: argparse.Namespace) -> int:
    from qwen2vl_edge.runtime.errors import ArtifactError, InputError
    from qwen2vl_edge.runtime.processor import is_batch

    try:
        pipe = _load(args)
        conversation = _conversation_from_args(args)
        options = dict(_generation_options(args), add_vision_id=args.add_vision_id)
        if args.json or is_batch(conversation):
            results = pipe.generate(conversation, **options)
            results = results if isinstance(results, list) else [results]
            payload = [r.to_dict() for r in results]
            print(json.dumps(payload if len(payload) > 1 else payload[0], indent=2 if not args.json else None))
        else:
            for piece in pipe.stream(conversation, **options):
                print(piece, end="", flush=True)
            print()
    except (InputError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


CHAT_HELP = ("/image PATH and /video PATH attach to your next message; /reset forgets the conversation; "
             "/quit (or end of input) leaves")


def _chat(args: argparse.Namespace) -> int:
    """An interactive session: the KV cache is kept between turns, so follow-ups start at once."""
    from qwen2vl_edge.runtime.errors import ArtifactError, InputError

    try:
        pipe = _load(args)
        session = pipe.chat(system=args.system, overflow=args.overflow, add_vision_id=args.add_vision_id,
                            **_generation_options(args))
    except (InputError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(CHAT_HELP, file=sys.stderr)
    attached: dict[str, list] = {"image": [], "video": []}
    for line in sys.stdin:
        line = line.strip()
        command, _, rest = line.partition(" ")
        if command == "/quit":
            break
        if command == "/reset":
            session.reset()
            attached = {"image": [], "video": []}
        elif command in ("/image", "/video") and rest:
            attached[command[1:]].append(rest.strip())
        elif line:
            try:
                for piece in session.stream(_user_content(args, attached["image"], attached["video"], line)):
                    print(piece, end="", flush=True)
                print()
                usage, cached = session.last_result.usage, session.last_result.usage["cached_prompt_tokens"]
                print(f"[{cached} cached + {usage['prompt_tokens'] - cached} new prompt tokens, "
                      f"{session.last_result.timings['time_to_first_token']:.2f} s to first token]", file=sys.stderr)
            except InputError as e:
                print(f"error: {e}", file=sys.stderr)
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

    limits = Limits(max_image_tokens=args.max_image_tokens, max_frames=args.max_frames, max_prompt=args.max_prompt,
                    max_context=args.max_context, max_batch=args.max_batch)
    build_trt(args.artifact, precision=args.precision, limits=limits, workspace_gb=args.workspace_gb,
              timing_cache=args.timing_cache)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from qwen2vl_edge.benchmarks.bench import run_bench

    ints = lambda text: [int(x) for x in text.split(",")] if text else None  # noqa: E731
    if args.quick:
        args.model, args.repeats, args.new_tokens = "tiny", 1, 8
    from qwen2vl_edge.benchmarks.bench import DEFAULT_SYSTEMS

    run_bench(args.model, args.systems or DEFAULT_SYSTEMS, args.layers, args.threads, args.new_tokens, args.repeats, Path(args.out),
              quick=args.quick, resolutions=ints(args.resolutions), contexts=ints(args.contexts))
    return 0


def _generation_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", help="system message")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--greedy", action="store_true", help="greedy decoding (also the default unless --temperature "
                                                         "or the checkpoint's generation_config.json samples)")
    p.add_argument("--temperature", type=float, help="sample at this temperature")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop when the reply contains this text (repeatable)")
    p.add_argument("--min-pixels", type=int, help="per image / video frame: at least this many pixels")
    p.add_argument("--max-pixels", type=int, help="per image / video frame: at most this many pixels")
    fps = p.add_mutually_exclusive_group()
    fps.add_argument("--fps", type=float, help="video frames sampled per second (default 2)")
    fps.add_argument("--nframes", type=int, help="video frames sampled in all")
    p.add_argument("--add-vision-id", action="store_true", help="label images 'Picture 1:', videos 'Video 1:'")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime")
    p.add_argument("--threads", type=int)
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the artifact files")
    p.add_argument("--session-cache", metavar="DIR",
                   help="keep ONNX Runtime's optimized graphs and CPU-packed weights in DIR: later starts are "
                        "faster (first start writes about the artifact's size again, twice for quantized weights)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen2vl-edge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny", help="write a tiny random Qwen2-VL checkpoint (needs [export])")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=["original", "v5"], default="original")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. text.num_hidden_layers=3, vision.depth=1, tie_word_embeddings=false")
    p.set_defaults(func=_make_tiny)

    p = sub.add_parser("export", help="checkpoint -> ONNX artifact directory (needs [export])")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--all-logits", action="store_true",
                   help="decoder returns logits for every position (default: last position only)")
    p.add_argument("--target", choices=["portable", "ort-cpu"], default="portable",
                   help="portable: standard ONNX (TensorRT, any runtime); ort-cpu: ONNX Runtime CPU kernels")
    p.add_argument("--weights", choices=["fp32", "int8", "int4"], default="fp32", help="decoder weights (ort-cpu)")
    p.add_argument("--vision-weights", choices=["fp32", "int8", "int4", "int8-dynamic"], default="fp32",
                   help="int8/int4: MatMulNBits blocks; int8-dynamic: per-channel int8 weights with activations "
                        "quantized per tensor at run time (faster vision, coarser activations)")
    p.add_argument("--block-size", type=int, default=32, help="quantization block along the input channels")
    p.add_argument("--accuracy-level", type=int, default=4, help="MatMulNBits accuracy_level (4: int8 activations)")
    p.set_defaults(func=_export)

    p = sub.add_parser("run", help="generate from an artifact directory (no torch needed)")
    p.add_argument("artifact")
    p.add_argument("--messages", help="JSON file: one conversation or a list of conversations")
    p.add_argument("--image", action="append")
    p.add_argument("--video", action="append", help="a file path or http(s) URL (needs [video])")
    p.add_argument("--prompt")
    _generation_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text "
                                                       "(text, token_ids, boxes, video_timestamps, timings, usage)")
    p.set_defaults(func=_run)

    p = sub.add_parser("chat", help="interactive chat that keeps the KV cache between turns (no torch needed)")
    p.add_argument("artifact")
    p.add_argument("--overflow", choices=["error", "slide"], default="error",
                   help="when the context is full: report it, or start over from the latest turns")
    _generation_flags(p)
    p.set_defaults(func=_chat)

    p = sub.add_parser("quickstart", help="tiny checkpoint -> export -> multi-image chat -> parity check")
    p.add_argument("--dir", default="qwen2vl-edge-quickstart")
    p.set_defaults(func=_quickstart)

    p = sub.add_parser("build-trt", help="compile the artifact's graphs into TensorRT engines (on the device)")
    p.add_argument("artifact")
    p.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default="fp16")
    p.add_argument("--max-image-tokens", type=int, default=1280, help="merged tokens per image / video frame pair")
    p.add_argument("--max-frames", type=int, default=16, help="video frames per encoder call")
    p.add_argument("--max-prompt", type=int, default=2048)
    p.add_argument("--max-context", type=int, default=4096)
    p.add_argument("--max-batch", type=int, default=1)
    p.add_argument("--workspace-gb", type=float, default=4.0)
    p.add_argument("--timing-cache", help="timing cache file to reuse across builds (default: ARTIFACT/engines/)")
    p.set_defaults(func=_build_trt)

    p = sub.add_parser("bench", help="latency, throughput and memory side by side with transformers")
    p.add_argument("--model", default="tiny", help="tiny | 2b-shape | 7b-shape | CHECKPOINT_DIR")
    p.add_argument("--layers", type=int, help="text decoder depth for quicker runs (shapes only)")
    p.add_argument("--systems", default=None,
                   help="comma list (default: all but ours-ort-int4-vdq; see SYSTEMS in benchmarks/bench.py)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--resolutions", help="comma list of square image sides for the TTFT sweep")
    p.add_argument("--contexts", help="comma list of prompt lengths for the decode sweep")
    p.add_argument("--out", default="bench-out")
    p.add_argument("--quick", action="store_true", help="tiny model, one repeat: a smoke run (CI)")
    p.set_defaults(func=_bench)

    p = sub.add_parser("check-trt", help="check that an artifact's graphs fit TensorRT's ONNX parser (CPU only)")
    p.add_argument("artifact")
    p.add_argument("--trt-version", default=None)
    p.set_defaults(func=_check_trt)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # our errors name the fix; no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
