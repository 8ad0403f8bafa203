"""One system measured in its own process, so its start-up and peak RSS are its own.

    python -m qwen2vl_edge.benchmarks.worker SPEC.json OUT.json

SPEC holds the system name, model dirs, threads, new tokens, repeats, the conversations and the
parent's clock at spawn time (for cold start).
"""

from __future__ import annotations

import json
import statistics
import sys
import time


def _status_bytes(key: str, pid: int | str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


def peak_rss_bytes(pid: int | str = "self") -> int:
    """A process's peak resident set (VmHWM), this one's by default. Not getrusage: ru_maxrss survives exec,
    so a worker would inherit its parent's peak."""
    return _status_bytes("VmHWM", pid)


def rss_bytes(pid: int | str = "self") -> int:
    """A process's resident set now (VmRSS)."""
    return _status_bytes("VmRSS", pid)


class CannotRun(Exception):
    """A system that cannot run a scenario (a peer without video input, say): its cell says why."""


_earlier_peaks: list[int] = []  # VmHWM before each reset, so the whole run's peak is not lost


def whole_run_peak_rss_bytes() -> int:
    return max(_earlier_peaks + [peak_rss_bytes()])


def reset_peak_rss() -> bool:
    """Start VmHWM afresh from the current RSS (Linux >= 4.0), so each scenario gets its own peak."""
    _earlier_peaks.append(peak_rss_bytes())
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _device_free() -> int:
    from qwen2vl_edge.runtime.backends.cuda import device_memory

    return device_memory()[0]


class Ours:
    """qwen2vl-edge on ONNX Runtime (CPU): the pipeline's own timings."""

    def __init__(self, artifact: str, threads: int, backend: str = "onnxruntime", session_cache: str | None = None,
                 session_config: dict | None = None):
        from qwen2vl_edge.runtime import Qwen2VLPipeline

        options = ({"num_threads": threads, "session_cache": session_cache, "session_config": session_config}
                   if backend == "onnxruntime" else {})
        free = _device_free() if backend == "tensorrt" else None
        self.pipe = Qwen2VLPipeline.load(artifact, backend=backend, verify=False, **options)
        self.device_memory_bytes = free - _device_free() if free is not None else None  # engines, pool, buffers

    def run(self, conversation, new_tokens: int) -> dict:
        t0 = time.time()
        r = self.pipe.generate(conversation, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        t = r.timings
        return {"preprocess": t["preprocess"], "vision": t["vision"], "ttft": t["time_to_first_token"],
                "decode_tok_s": 1.0 / t["decode_per_token"] if t["decode_per_token"] else 0.0,
                "e2e": t["total"], "prompt_tokens": r.usage["prompt_tokens"],
                "outside_graphs_ms": 1e3 * t["decode_outside_graphs_per_token"],
                "first_token_at": t0 + t["time_to_first_token"]}


class Transformers:
    """transformers' Qwen2VLForConditionalGeneration + processor + qwen-vl-utils, as the model card runs it."""

    def __init__(self, checkpoint: str, threads: int, dtype: str):
        import torch
        from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

        torch.set_num_threads(threads)
        self.torch = torch
        self.proc = AutoProcessor.from_pretrained(checkpoint)
        self.model = Qwen2VLForConditionalGeneration.from_pretrained(
            checkpoint, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32).eval()

    def _inputs(self, conversation):
        from qwen_vl_utils import process_vision_info

        text = self.proc.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        images, videos = process_vision_info(conversation)
        return self.proc(text=[text], images=images, videos=videos, return_tensors="pt",
                         videos_kwargs={"do_sample_frames": False, "cap_pixels_per_frame": True})

    def run(self, conversation, new_tokens: int) -> dict:
        from transformers import LogitsProcessor, LogitsProcessorList

        stamps: list[float] = []

        class Stamp(LogitsProcessor):  # called once per new token, right after its forward pass
            def __call__(self, input_ids, scores):
                stamps.append(time.perf_counter())
                return scores

        torch = self.torch
        wall0, t0 = time.time(), time.perf_counter()
        inputs = self._inputs(conversation)
        t1 = time.perf_counter()
        with torch.no_grad():  # the vision encoder alone, for its own figure (generate runs it again)
            if "pixel_values" in inputs:
                self.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            if "pixel_values_videos" in inputs:
                self.model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        t2 = time.perf_counter()
        g0 = time.perf_counter()
        with torch.no_grad():
            self.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                logits_processor=LogitsProcessorList([Stamp()]))
        g1 = time.perf_counter()
        steps = [b - a for a, b in zip(stamps, stamps[1:])]
        ttft = (t1 - t0) + (stamps[0] - g0)
        return {"preprocess": t1 - t0, "vision": t2 - t1, "ttft": ttft,
                "decode_tok_s": 1.0 / statistics.median(steps) if steps else 0.0,
                "e2e": (t1 - t0) + (g1 - g0), "prompt_tokens": int(inputs["input_ids"].shape[1]),
                "first_token_at": wall0 + ttft}


def make_system(spec: dict):
    name = spec["system"]
    if name.startswith("ours"):
        return Ours(spec["artifact"], spec["threads"], backend=spec.get("backend", "onnxruntime"),
                    session_cache=spec.get("session_cache"), session_config=spec.get("session_config"))
    return Transformers(spec["checkpoint"], spec["threads"], "bf16" if name.endswith("bf16") else "fp32")


def measure(system, conversation, new_tokens: int, repeats: int) -> dict:
    """Warm-up excluded; peak RSS of this scenario alone (weights and what earlier scenarios left included).

    A system whose runs happen in child processes reports each run's peak itself (`peak_rss_bytes` in the
    run's dict); one that cannot run the scenario gets {"cannot_run": why}."""
    own_peak = reset_peak_rss()
    try:
        system.run(conversation, new_tokens)
    except CannotRun as e:
        return {"cannot_run": str(e)}
    runs = [system.run(conversation, new_tokens) for _ in range(repeats)]
    keys = ("preprocess", "vision", "ttft", "decode_tok_s", "e2e") + (("outside_graphs_ms",)
                                                                      if "outside_graphs_ms" in runs[0] else ())
    # None: a stage this system does not time (llama.cpp's preprocessing)
    out = {k: None if runs[0][k] is None else _stats([r[k] for r in runs]) for k in keys}
    out["prompt_tokens"] = runs[0]["prompt_tokens"]
    if "peak_rss_bytes" in runs[0]:
        out["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in runs)
    else:
        out["peak_rss_bytes"] = peak_rss_bytes() if own_peak else None
    return out


def sweep_point(system, conversation) -> float | str:
    """One size of the resolution sweep: its time to first token, or why this system cannot run it (a peer's
    CannotRun, our memory check's refusal, an allocation that failed), so the sweep goes on to the other sizes
    and systems."""
    try:
        m = measure(system, conversation, 2, 1)
    except MemoryError:
        return "out of memory"
    except Exception as e:  # noqa: BLE001 (our InputError, ONNX Runtime's or torch's allocation errors)
        if type(e).__name__ == "InputError" or "memory" in str(e).lower() or "alloc" in str(e).lower():
            return f"cannot run: {str(e).splitlines()[0][:300]}"
        raise
    return f"cannot run: {m['cannot_run']}" if "cannot_run" in m else m["ttft"]["median"]


def main(spec_path: str, out_path: str, make=make_system) -> None:
    """`make(spec)` builds the system: ours and transformers here, a peer's in its own worker."""
    spec = json.loads(open(spec_path).read())
    system = make(spec)
    ready = time.time() - spec["spawned_at"]
    if spec.get("prepare"):  # only start (writing the session cache), measure nothing else
        with open(out_path, "w") as f:
            json.dump({"system": spec["system"], "cold_start_ready_s": ready}, f)
        return
    if spec.get("only"):  # one of several fresh processes measuring one scenario alone
        m = measure(system, spec["scenarios"][spec["only"]], spec["new_tokens"], spec["repeats"])
        with open(out_path, "w") as f:
            json.dump({"system": spec["system"], "cold_start_ready_s": ready, "scenario": m}, f)
        return
    names = list(spec["scenarios"])
    first = system.run(spec["scenarios"][names[0]], spec["new_tokens"])  # cold: first request of the process
    if "ready_at" in first:  # a system whose model loads in each run's own process (llama.cpp's CLI)
        ready = first["ready_at"] - spec["spawned_at"]
    result = {"system": spec["system"], "cold_start_ready_s": ready,
              "cold_start_first_token_s": first["first_token_at"] - spec["spawned_at"], "scenarios": {},
              "ttft_vs_resolution": {}, "decode_vs_context": {}}
    for name in names:
        m = result["scenarios"][name] = measure(system, spec["scenarios"][name], spec["new_tokens"], spec["repeats"])
        print(f"  {spec['system']} {name}: " + (f"cannot run: {m['cannot_run']}" if "cannot_run" in m else
                                                f"ttft {m['ttft']['median']:.3f} s, "
                                                f"decode {m['decode_tok_s']['median']:.1f} tok/s"), flush=True)
    for size, conv in spec.get("resolutions", {}).items():
        result["ttft_vs_resolution"][size] = sweep_point(system, conv)
    for length, conv in spec.get("contexts", {}).items():
        m = measure(system, conv, spec["new_tokens"], 1)
        if "decode_tok_s" in m:
            result["decode_vs_context"][length] = {"prompt_tokens": m["prompt_tokens"],
                                                   "decode_tok_s": m["decode_tok_s"]["median"]}
    result["peak_rss_bytes"] = getattr(system, "whole_run_peak_rss_bytes", whole_run_peak_rss_bytes)()
    if getattr(system, "settings", None):  # a peer's versions and the defaults it ran with
        result["settings"] = system.settings
    if getattr(system, "device_memory_bytes", None) is not None:
        result["device_memory_at_load_bytes"] = system.device_memory_bytes
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
