"""Benchmark results -> markdown table with ratios, and PNG plots."""

from __future__ import annotations

from pathlib import Path

REFERENCE = "transformers"  # the ratio column divides by this system


def _fmt(x: float | None, unit: str = "", digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}{unit}"


def median(cell: dict, key: str) -> float | None:
    """A scenario cell's median of `key`; None where the system cannot run it or does not time that stage."""
    value = cell.get(key)
    return value["median"] if value else None


def _ratio(a: float | None, b: float | None, fmt: str) -> str:
    return "—" if a is None or not b else format(a / b, fmt)


def summary_rows(result: dict) -> list[dict]:
    rows = []
    for name, r in result["systems"].items():
        sc = r["scenarios"]
        rows.append({
            "system": name,
            "disk_gb": r["weights_on_disk_bytes"] / 1e9,
            "s1_ttft": median(sc["image_448"], "ttft"),
            "vision": median(sc["image_448"], "vision"),
            "decode": median(sc["text_only"], "decode_tok_s"),
            "decode_processes": r.get("decode_tok_s_processes"),
            "roofline_pct": r["decode_roofline_fraction"] and 100 * r["decode_roofline_fraction"],
            "s2_ttft": median(sc["text_274"], "ttft"),
            "s1_rss_gb": (sc["image_448"].get("peak_rss_bytes") or r["peak_rss_bytes"]) / 1e9,
            "rss_gb": r["peak_rss_bytes"] / 1e9,
            "outside_ms": median(sc["text_only"], "outside_graphs_ms"),
            "sampled_ms": result.get("host_loop", {}).get("median_ms") if name.startswith("ours") else None,
            "cold_ready": r["cold_start_ready_s"],
            "cold_first": r["cold_start_first_token_s"],
        })
    return rows


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# qwen2vl-edge benchmark: {result['model']}" + (f" (text layers: {result['layers']})"
                                                          if result.get("layers") else " (full depth)"),
        "",
        f"{m['date']} · {m['cpu']} · {m['cores']} cores, {m['threads']} threads for every system · "
        f"{m['ram_gb']} GB RAM · copy bandwidth {m['copy_bandwidth_gb_s']} GB/s · fp32 matmul "
        f"{m['matmul_gflop_s']} GFLOP/s · {result['new_tokens']} new tokens forced · median of "
        f"{result['repeats']} warm runs",
        "",
        "S1 = one 448x448 image + short prompt; S2 = a text prompt of "
        f"{next(iter(result['systems'].values()))['scenarios']['text_274'].get('prompt_tokens')} tokens; "
        "decode = text-only prompt; roofline = decode tok/s / (bandwidth / weight bytes per token); "
        "loop overhead = median time per decode step spent outside graph runs (sampling, bookkeeping, "
        "I/O binding), greedy; sampled loop = the same with top_p=0.9, top_k=50, repetition_penalty=1.1 at the "
        "151,936-token vocabulary after 1,000 generated tokens, on synthetic logits (benchmarks/host_loop.py; "
        "one loop for every ours system); peak RSS S1 = the S1 runs alone (weights included), whole run = every "
        "scenario and sweep.",
        "",
        "| system | weights on disk | S1 time to first token | vision encoder | decode tok/s | decode % of roofline "
        "| loop overhead | sampled loop | S2 time to first token | peak RSS S1 | peak RSS whole run | cold start → ready "
        "| → first token |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = summary_rows(result)
    for r in rows:
        lines.append(f"| {r['system']} | {_fmt(r['disk_gb'], ' GB')} | {_fmt(r['s1_ttft'], ' s', 3)} | "
                     f"{_fmt(r['vision'], ' s', 3)} | {_fmt(r['decode'], '', 1)} | {_fmt(r['roofline_pct'], ' %', 0)} | "
                     f"{_fmt(r['outside_ms'], ' ms')} | {_fmt(r['sampled_ms'], ' ms')} | "
                     f"{_fmt(r['s2_ttft'], ' s', 3)} | {_fmt(r['s1_rss_gb'], ' GB')} | "
                     f"{_fmt(r['rss_gb'], ' GB')} | {_fmt(r['cold_ready'], ' s')} | "
                     f"{_fmt(r['cold_first'], ' s')} |")
    spreads = [r for r in rows if r["decode_processes"]]
    if spreads:
        lines += ["", "Decode tok/s in fresh processes (text-only prompt; each process's median step):", "",
                  "| system | processes | median | min | max | ± half-range |", "|---|---|---|---|---|---|"]
        for r in spreads:
            d = r["decode_processes"]
            lines.append(f"| {r['system']} | {len(d['values'])} | {d['median']:.1f} | {d['min']:.1f} | "
                         f"{d['max']:.1f} | {100 * d['half_range']:.1f} % |")
    first = {n: r["first_start_ready_s"] for n, r in result["systems"].items() if r.get("first_start_ready_s")}
    if first:
        lines += ["", "Started from ONNX Runtime's session cache (graphs optimized, weights packed for this CPU): "
                  + ", ".join(first) + "; their cold start above is a restart. The first start, which wrote the "
                  "cache, took " + ", ".join(f"{v:.1f} s ({n})" for n, v in first.items()) + " to ready."]
    for name, r in result["systems"].items():
        if r.get("conversion"):
            settings = ", ".join(f"{k} {v}" for k, v in r.get("settings", {}).items())
            lines += ["", f"{name}: the same checkpoint through {r['conversion']}; ran with {settings}."]
    ref = next((r for r in rows if r["system"] == REFERENCE), None)
    if ref:
        lines += ["", f"Ratios against {REFERENCE} (speed: higher is better for us; memory: lower is better):", "",
                  "| system | S1 TTFT speed-up | decode speed-up | S2 TTFT speed-up | S1 peak RSS ratio |",
                  "|---|---|---|---|---|"]
        for r in rows:
            if r["system"] != REFERENCE:
                lines.append(f"| {r['system']} | {_ratio(ref['s1_ttft'], r['s1_ttft'], '.2f')}x | "
                             f"{_ratio(r['decode'], ref['decode'], '.2f')}x | {_ratio(ref['s2_ttft'], r['s2_ttft'], '.2f')}x"
                             f" | {_ratio(r['s1_rss_gb'], ref['s1_rss_gb'], '.2f')} |")
    lines += _sweep_table(result)
    lines += ["", "All scenarios (median s; decode tok/s; peak RSS of the scenario's runs):", "",
              "| system | scenario | prompt tokens | preprocess | vision | TTFT | decode tok/s | end to end | peak RSS |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["systems"].items():
        for sc, v in r["scenarios"].items():
            if "cannot_run" in v:
                lines.append(f"| {name} | {sc} | cannot run: {v['cannot_run']} | | | | | | |")
                continue
            rss = v.get("peak_rss_bytes")
            lines.append(f"| {name} | {sc} | {v['prompt_tokens']} | {_fmt(median(v, 'preprocess'), '', 3)} | "
                         f"{_fmt(median(v, 'vision'), '', 3)} | {_fmt(median(v, 'ttft'), '', 3)} | "
                         f"{_fmt(median(v, 'decode_tok_s'), '', 1)} | {_fmt(median(v, 'e2e'), '', 3)} | "
                         f"{_fmt(rss and rss / 1e9, ' GB')} |")
    vf = result.get("vision_roofline")
    if vf:
        lines += ["", f"Vision encoder, S1: {vf['gflop']:.0f} GFLOP; at the measured matmul rate the best time is "
                  f"{vf['best_s']:.3f} s. " + ", ".join(f"{k} reaches {v:.0%}" for k, v in vf["fraction"].items()) + "."]
    return "\n".join(lines) + "\n"


def _sweep_table(result: dict) -> list[str]:
    """Time to first token per square image side and system; a size a system cannot run shows why."""
    sides = sorted({int(k) for r in result["systems"].values() for k in r.get("ttft_vs_resolution", {})})
    if not sides:
        return []
    lines = ["", "Time to first token vs image side (one square image, s):", "",
             "| system | " + " | ".join(f"{s} px" for s in sides) + " |", "|---|" + "---|" * len(sides)]
    for name, r in result["systems"].items():
        cells = {int(k): v for k, v in r.get("ttft_vs_resolution", {}).items()}
        lines.append(f"| {name} | " + " | ".join(
            "—" if s not in cells else cells[s] if isinstance(cells[s], str) else f"{cells[s]:.2f}" for s in sides)
            + " |")
    return lines


def plots(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = result["systems"]
    lines = {  # file -> (points of one system, x label, y label, title)
        "ttft_vs_resolution.png": (lambda r: [(int(k), v) for k, v in r["ttft_vs_resolution"].items()
                                              if v is not None and not isinstance(v, str)],  # a reason: no point
                                   "image side (px, square)", "time to first token (s)", "TTFT vs image resolution"),
        "decode_vs_context.png": (lambda r: [(v["prompt_tokens"], v["decode_tok_s"])
                                             for v in r["decode_vs_context"].values()],  # runnable ones only
                                  "context (prompt tokens)", "decode tokens/s", "Decode speed vs context length"),
    }
    paths = []
    for filename, (points, xlabel, ylabel, title) in lines.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, r in systems.items():
            pts = sorted(points(r))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.legend(), ax.grid(alpha=0.3)
        paths.append(out / filename)
        fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    fig, ax = plt.subplots(figsize=(6, 4))
    x = range(len(systems))
    ax.bar([i - 0.2 for i in x], [(r["scenarios"]["image_448"].get("peak_rss_bytes") or 0) / 1e9
                                  for r in systems.values()], width=0.4, label="S1 runs")
    ax.bar([i + 0.2 for i in x], [r["peak_rss_bytes"] / 1e9 for r in systems.values()], width=0.4,
           label="whole run (sweeps included)")
    ax.set_xticks(list(x), list(systems))
    ax.set(ylabel="peak RSS (GB)", title="Peak resident memory per system")
    ax.legend()
    ax.tick_params(axis="x", rotation=20)
    paths.append(out / "peak_rss.png")
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close("all")
    return paths
