"""What DeepStack costs a Qwen3-VL decoder run, from ONNX Runtime's own node timings:
`python -m qwen2vl_edge.benchmarks.deepstack_cost ARTIFACT [--new-tokens N] [--side PX] [--threads T]`.

One image reply runs with the decoder session profiled. DeepStack's nodes are found in the graph, not by name:
whatever depends on the inputs visual_index and deepstack_embeds up to the Adds that join the residual stream
(one Concat, 2K Gathers, K Adds). Per decoder run: their summed kernel time against the run's whole time, for the
prefill and for the median decode step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnx

DEEPSTACK_INPUTS = ("visual_index", "deepstack_embeds")


def deepstack_nodes(decoder: Path) -> set[str]:
    """Names of the decoder's nodes that compute DeepStack's contribution: those reached from its two inputs,
    stopping at (and counting) the Adds that put a feature into the residual stream."""
    nodes = onnx.load(str(decoder), load_external_data=False).graph.node
    reached, names = set(DEEPSTACK_INPUTS), set()
    for node in nodes:  # graph order is topological
        if any(i in reached for i in node.input):
            names.add(node.name)
            if node.op_type != "Add":  # an Add joins the residual stream: what follows is the model's own work
                reached.update(node.output)
    return names


def run_times(profile: Path, nodes: set[str]) -> list[tuple[float, float]]:
    """(DeepStack's kernel microseconds, the run's microseconds) per decoder run, in order."""
    events = json.loads(profile.read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    spent = [0.0] * len(runs)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["name"][:-12] in nodes:
            k = next(i for i, (start, end) in enumerate(runs) if start <= e["ts"] <= end)
            spent[k] += e["dur"]
    return [(s, end - start) for s, (start, end) in zip(spent, runs)]


def measure(artifact: Path, new_tokens: int = 32, side: int = 448, threads: int = 2) -> dict:
    from qwen2vl_edge.runtime import Qwen2VLPipeline
    from qwen2vl_edge.runtime.backends import onnxruntime as ort_backend

    options = ort_backend.session_options
    prefix = str(Path(tempfile.gettempdir()) / "deepstack")

    def profiled(*args, **kwargs):  # every graph's session profiles; only the decoder's profile is read
        opts = options(*args, **kwargs)
        opts.enable_profiling, opts.profile_file_prefix = True, prefix
        return opts

    ort_backend.session_options = profiled
    try:
        pipe = Qwen2VLPipeline.load(artifact, num_threads=threads)
    finally:
        ort_backend.session_options = options
    nodes = deepstack_nodes(pipe.artifact.graph_path("decoder"))
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    conv = [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(pixels)},
                                         {"type": "text", "text": "Describe this image."}]}]
    pipe.generate(conv, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    decoder = pipe.backend.sessions["decoder"]
    profile = Path(decoder.end_profiling())
    times = run_times(profile, nodes)  # read before another session's profile may take its name (same millisecond)
    paths = {profile} | {Path(s.end_profiling()) for s in pipe.backend.sessions.values() if s is not decoder}
    for path in paths:
        path.unlink(missing_ok=True)
    prefill, steps = times[:-(new_tokens - 1)], times[-(new_tokens - 1):]  # the prompt may take several runs
    step_ds, step_all = statistics.median(s for s, _ in steps), statistics.median(t for _, t in steps)
    return {"artifact": str(artifact), "deepstack_nodes": len(nodes), "image_side": side, "new_tokens": new_tokens,
            "threads": threads, "prefill_us": {"deepstack": sum(s for s, _ in prefill), "runs": len(prefill),
                                               "run": sum(t for _, t in prefill)},
            "decode_step_us": {"deepstack": step_ds, "run": step_all, "share": step_ds / step_all}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--side", type=int, default=448, help="side of the square image")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    print(json.dumps(measure(args.artifact, args.new_tokens, args.side, args.threads), indent=2))


if __name__ == "__main__":
    main()
