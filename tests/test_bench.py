"""The benchmark's arithmetic, and a quick run whose report must be complete (no speed assertions)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import requires_torch
from qwen2vl_edge.benchmarks import roofline
from test_tensorrt import CFG_2B


def test_decode_bytes_per_token_of_the_2b():
    # Qwen2-VL-2B's language model has Qwen2-1.5B's shape: 1,543,714,304 parameters with the
    # embedding counted once (it is the lm_head); decode reads all of them once per token.
    assert roofline.decoder_weight_params(CFG_2B) == 1_543_714_304
    assert roofline.decode_roofline_tok_s(CFG_2B, "fp32", 44e9) == 44e9 / (4 * 1_543_714_304)


def test_vision_flops_grow_with_patches():
    one, four = roofline.vision_flops(CFG_2B, 1024), roofline.vision_flops(CFG_2B, 4096)
    assert 4 * one < four < 16 * one  # linear layers scale with S, attention with S^2


@requires_torch
def test_quick_bench_report_is_complete(tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run([sys.executable, "-m", "qwen2vl_edge", "bench", "--quick", "--out", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    data = json.loads((out / "result.json").read_text())
    m = data["machine"]
    assert {"cpu", "cores", "threads", "ram_gb", "copy_bandwidth_gb_s", "matmul_gflop_s", "versions", "date"} <= set(m)
    assert m["copy_bandwidth_gb_s"] > 0 and m["matmul_gflop_s"] > 0
    assert set(data["systems"]) == {"ours-ort-cpu", "ours-ort-cpu-fp16w", "ours-ort-int8", "ours-ort-int4",
                                    "transformers", "transformers-bf16"}
    for name, r in data["systems"].items():
        assert set(r["scenarios"]) == {"image_448", "three_images", "video_16_frames", "text_only", "text_274",
                                       "long_text_2k"}
        assert r["scenarios"]["text_274"]["prompt_tokens"] == 274  # the issue's S2, with Qwen2's real vocabulary
        s1_peak = r["scenarios"]["image_448"]["peak_rss_bytes"]
        assert 0 < s1_peak <= r["peak_rss_bytes"]
        for sc in r["scenarios"].values():
            for key in ("preprocess", "vision", "ttft", "decode_tok_s", "e2e"):
                s = sc[key]
                assert s["min"] <= s["median"] <= s["max"] and s["min"] >= 0
            assert sc["decode_tok_s"]["median"] > 0 and sc["prompt_tokens"] > 0
            if name.startswith("ours"):  # time per decode step outside graph runs
                assert 0 < sc["outside_graphs_ms"]["median"] < 1e3 / sc["decode_tok_s"]["median"]
        assert r["peak_rss_bytes"] > 0 and 0 < r["cold_start_ready_s"] <= r["cold_start_first_token_s"]
        assert 0 < r["decode_roofline_fraction"] and r["weights_on_disk_bytes"] > 0
        assert (r["first_start_ready_s"] is not None) == (name in ("ours-ort-int8", "ours-ort-int4"))
        assert len(r["ttft_vs_resolution"]) == 2 and len(r["decode_vs_context"]) == 2
    loop = data["host_loop"]  # the sampled host loop at the real vocabulary, after 1,000 tokens
    assert loop["vocab"] == 151_936 and loop["after_tokens"] == 1000 and 0 < loop["median_ms"] <= loop["p90_ms"]
    md = (out / "report.md").read_text()
    assert "| sampled loop |" in md
    assert md.count("| ours-ort-cpu |") == 1 + 1 + 1 + 6  # main, ratio and sweep tables, one row per scenario
    assert "| transformers |" in md and "decode speed-up" in md and "session cache" in md
    for png in ("ttft_vs_resolution.png", "decode_vs_context.png", "peak_rss.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@requires_torch
def test_resolution_sweep_reaches_1792_and_a_size_a_system_cannot_run_says_why(tiny_artifact, tmp_path):
    """The sweep's last size is 1792 px; our memory check refusing it (a limit the weights leave ~1 GB under)
    gives a cell with the reason, and the smaller size still its time."""
    from qwen2vl_edge.benchmarks import report, scenarios, worker

    assert scenarios.SWEEP_SIDES[-1] == 1792
    sweep = scenarios.resolution_sweep(tmp_path, [224, 1792])
    ours = worker.Ours(str(tiny_artifact), 1)
    ours.pipe.memory_limit = ours.pipe.artifact.weight_bytes + 10**9
    cells = {side: worker.sweep_point(ours, conv) for side, conv in sweep.items()}
    assert isinstance(cells[224], float) and cells[224] > 0
    assert cells[1792].startswith("cannot run: this request needs about") and "max_pixels=" in cells[1792]
    table = "\n".join(report._sweep_table({"systems": {"ours": {"ttft_vs_resolution": cells}}}))
    assert "| 224 px | 1792 px |" in table and f"| ours | {cells[224]:.2f} | cannot run: " in table


def test_first_token_of_one_image_reports_time_and_peak(tiny_artifact, tmp_path):
    """benchmarks/first_token.py (the 12 MP photo goal's measurement) on the tiny model and a small image."""
    from qwen2vl_edge.benchmarks import first_token

    out = tmp_path / "r.json"
    assert first_token.main([str(tiny_artifact), "--size", "280x210", "--threads", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["image"] == [280, 210] and r["prompt_tokens"] > 75  # 10 x 7 merged tokens + the template
    assert 0 < r["rss_after_load_bytes"] < r["peak_rss_bytes"]
    assert 0 < r["timings"]["vision"] < r["timings"]["time_to_first_token"]
