"""One scenario over fresh processes: how much one process differs from the next, per artifact and setting.

    python -m qwen2vl_edge.benchmarks.decode_spread ARTIFACT [--processes 5] [--threads 2] [--repeats 3]
        [--scenario text_only] [--setting NAME=KEY:VALUE,KEY:VALUE ...] [--variant NAME=ARTIFACT ...]
        [--session-cache DIR] [--out FILE]

Each process loads the pipeline (a `--setting` adds ONNX Runtime session config entries over the backend's
defaults; a `--variant` is another artifact) and runs one benchmark scenario (`--repeats` times after a
warm-up): its time to first token, decode tok/s (the median step) and the peak RSS of the scenario's runs
(weights included). Variants run in turns, one process
each per round, so that a machine whose load changes slows them alike. `default` (ARTIFACT as the backend
loads it) is always measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from qwen2vl_edge.export.vocab import cache_dir

from . import scenarios
from .launch import run_worker

MEASURES = ("ttft", "decode_tok_s", "peak_rss_bytes")


def spread(values: list[float]) -> dict:
    """Median, min, max and the half-range as a fraction of the median (the ± of 'within ±5 %')."""
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values), "values": values,
            "half_range": (max(values) - min(values)) / 2 / med}


def run(variants: dict[str, tuple[Path, dict]], scenario: str, processes: int, threads: int, repeats: int,
        new_tokens: int = 32, session_cache: str | None = None) -> dict:
    """variants: name -> (artifact, session config entries)."""
    conv = scenarios.scenarios(cache_dir() / "bench" / "inputs")[scenario]
    per = {name: {m: [] for m in MEASURES} for name in variants}
    # each process's own decode half-range over its repeats: when it is as wide as the spread between
    # processes, the machine varies over time (its neighbours, its clock), not the process
    within = {name: [] for name in variants}
    for round_ in range(processes):
        for name, (artifact, config) in variants.items():
            spec = {"system": f"ours-{name}", "artifact": str(artifact), "backend": "onnxruntime",
                    "threads": threads, "new_tokens": new_tokens, "repeats": repeats, "only": scenario,
                    "scenarios": {scenario: conv}, "session_config": config or None, "session_cache": session_cache}
            got = run_worker(spec, threads)["scenario"]
            for m in MEASURES:
                per[name][m].append(got[m] if m == "peak_rss_bytes" else got[m]["median"])
            d = got["decode_tok_s"]
            within[name].append((d["max"] - d["min"]) / 2 / d["median"])
            print(f"round {round_ + 1}: {name}: TTFT {got['ttft']['median']:.3f} s, decode "
                  f"{got['decode_tok_s']['median']:.1f} tok/s, peak RSS {got['peak_rss_bytes'] / 1e9:.2f} GB "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    return {"scenario": scenario, "threads": threads, "processes": processes, "repeats": repeats,
            "date": time.strftime("%Y-%m-%d %H:%M"), "load_average_1min_end": os.getloadavg()[0],
            "variants": {n: {"artifact": str(a), "session_config": c} for n, (a, c) in variants.items()},
            "results": {name: {**{m: spread(v) for m, v in ms.items()},
                               "decode_half_range_within_process": spread(within[name])}
                        for name, ms in per.items()}}


def _named(text: str) -> tuple[str, str]:
    name, _, value = text.partition("=")
    return name, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--processes", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scenario", default="text_only")
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=KEY:VALUE,...")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=ARTIFACT")
    parser.add_argument("--session-cache")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    variants = {"default": (args.artifact, {})}
    for name, entries in map(_named, args.setting):
        variants[name] = (args.artifact, dict(e.split(":", 1) for e in entries.split(",") if e))
    for name, path in map(_named, args.variant):
        variants[name] = (Path(path), {})
    result = run(variants, args.scenario, args.processes, args.threads, args.repeats,
                 session_cache=args.session_cache)
    print(f"{args.scenario}, {args.processes} fresh processes each:\n"
          "| variant | TTFT median (min-max) | decode tok/s median (min-max) | decode ± between processes | "
          "decode ± within one (median) | peak RSS (max) |\n|---|---|---|---|---|---|")
    for name, r in result["results"].items():
        t, d = r["ttft"], r["decode_tok_s"]
        print(f"| {name} | {t['median']:.3f} s ({t['min']:.3f}-{t['max']:.3f}) | {d['median']:.1f} "
              f"({d['min']:.1f}-{d['max']:.1f}) | {100 * d['half_range']:.1f} % | "
              f"{100 * r['decode_half_range_within_process']['median']:.1f} % | "
              f"{r['peak_rss_bytes']['max'] / 1e9:.2f} GB |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
