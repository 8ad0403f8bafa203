"""ONNX Runtime session settings (issue 13): the backend's defaults and `session_config` reach every session,
bad values are a ConfigError; the benchmark's spread and profile summaries are plain arithmetic."""

from __future__ import annotations

import pytest

from qwen2vl_edge.benchmarks.decode_spread import spread
from qwen2vl_edge.benchmarks.prefill_profile import summarize
from qwen2vl_edge.runtime import Qwen2VLPipeline
from qwen2vl_edge.runtime.errors import ConfigError


def _entry(session, key: str) -> str:
    return session.get_session_options().get_session_config_entry(key)


def test_idle_threads_sleep_by_default(pipe_ort):
    for session in pipe_ort.backend.sessions.values():
        assert _entry(session, "session.intra_op.allow_spinning") == "0"


def test_session_config_reaches_every_graph_over_the_defaults(tiny_artifact_ort):
    pipe = Qwen2VLPipeline.load(tiny_artifact_ort, num_threads=1,
                                session_config={"session.intra_op.allow_spinning": "1",
                                                "session.dynamic_block_base": "4"})
    for session in pipe.backend.sessions.values():
        assert _entry(session, "session.intra_op.allow_spinning") == "1"
        assert _entry(session, "session.dynamic_block_base") == "4"
        assert _entry(session, "session.use_env_allocators") == "1"  # the shared arena stays


@pytest.mark.parametrize("bad", [{"session.intra_op.allow_spinning": 0}, ["a"], {1: "1"}])
def test_bad_session_config_is_a_config_error(tiny_artifact_ort, bad):
    with pytest.raises(ConfigError, match="session_config must be a dict"):
        Qwen2VLPipeline.load(tiny_artifact_ort, session_config=bad)


def test_tensorrt_takes_no_session_config(tiny_artifact_ort):
    with pytest.raises(ConfigError, match="ONNX Runtime options"):
        Qwen2VLPipeline.load(tiny_artifact_ort, backend="tensorrt", session_config={"a": "b"})


def test_spread_is_the_half_range_over_the_median():
    s = spread([40.0, 42.0, 44.0, 38.0, 42.0])
    assert (s["median"], s["min"], s["max"]) == (42.0, 38.0, 44.0)
    assert s["half_range"] == pytest.approx(3.0 / 42.0)


def test_profile_summary_groups_kernels_by_op_and_shape_and_skips_the_warm_up():
    def node(name, op, ts, dur):
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [{"name": "model_run", "ts": 0, "dur": 100}, node("mm_0", "MatMulNBits", 10, 80),  # warm-up: left out
              {"name": "model_run", "ts": 1000, "dur": 100}, node("mm_0", "MatMulNBits", 1010, 50),
              node("mm_1", "MatMulNBits", 1060, 20), node("gqa", "GroupQueryAttention", 1080, 10),
              {"name": "model_run", "ts": 2000, "dur": 200}, node("mm_0", "MatMulNBits", 2010, 70),
              node("mm_1", "MatMulNBits", 2080, 40), node("gqa", "GroupQueryAttention", 2120, 30)]
    ops = summarize(events, {"mm_0": "MatMulNBits 64x128", "mm_1": "MatMulNBits 128x64"})
    assert ops["(whole run)"]["ms"] == 0.15 and ops["MatMulNBits 64x128"]["ms"] == 0.06  # medians of two runs
    assert ops["MatMulNBits 128x64"]["ms"] == 0.03 and ops["GroupQueryAttention"]["ms"] == 0.02
    assert list(ops)[:2] == ["(whole run)", "MatMulNBits 64x128"]  # largest first
    assert ops["MatMulNBits 64x128"]["share"] == pytest.approx(0.4)


def test_int4_on_ort_cpu_defaults_to_blocks_of_128_fitted_to_each_linear():
    from qwen2vl_edge.export.quantize import QuantSpec, default_block

    assert default_block("ort-cpu", "int4") == (128, True)
    assert default_block("ort-cpu", "int8") == default_block("tensorrt", "int4") == (32, False)
    fitted = QuantSpec(4, 128, fit=True)
    assert [fitted.block(k, "w") for k in (1536, 8960, 64, 32, 48)] == [128, 128, 64, 32, 16]
    with pytest.raises(ValueError, match="does not divide the input dimension 40 of w"):
        fitted.block(40, "w")
    with pytest.raises(ValueError, match="--block-size 128 does not divide the input dimension 64"):
        QuantSpec(4, 128).block(64, "w")  # a block size asked for is never changed


def test_decode_spread_runs_each_variant_in_its_own_processes(tiny_artifact_ort):
    from qwen2vl_edge.benchmarks.decode_spread import run

    result = run({"default": (tiny_artifact_ort, {}), "spin": (tiny_artifact_ort,
                                                               {"session.intra_op.allow_spinning": "1"})},
                 "text_only", processes=1, threads=1, repeats=2, new_tokens=4)
    assert set(result["results"]) == {"default", "spin"}
    for r in result["results"].values():
        assert len(r["decode_tok_s"]["values"]) == 1 and r["decode_tok_s"]["min"] > 0
        assert 0 <= r["decode_half_range_within_process"]["median"] < 1  # its repeats' spread
        assert r["ttft"]["min"] > 0 and r["peak_rss_bytes"]["min"] > 0


def test_int4_roofline_counts_the_artifacts_blocks():
    from qwen2vl_edge.benchmarks import roofline

    assert roofline.bytes_per_weight("int4") == 0.625 and roofline.bytes_per_weight("int4", 128) == 0.53125
    assert roofline.bytes_per_weight("int8", 128) == 1.03125 and roofline.bytes_per_weight("fp16", 128) == 2


def test_bench_re_exports_a_cached_artifact_with_old_block_sizes(tmp_path):
    import json

    from qwen2vl_edge.benchmarks.models import VARIANTS, _current
    from qwen2vl_edge.runtime.artifact import FORMAT_VERSION

    def cached(block_size, version=FORMAT_VERSION):
        (tmp_path / "manifest.json").write_text(json.dumps({"format_version": version,
                                                            "export": {"block_size": block_size}}))
        return tmp_path

    assert not _current(cached(None, version=FORMAT_VERSION - 1), VARIANTS["fp32"])  # the runtime would refuse it

    assert not _current(cached(32), VARIANTS["int4"])  # written when int4 blocks were 32
    assert _current(cached({"decoder": 128, "vision_encoder": 32}), VARIANTS["int4"])
    assert not _current(cached(32), VARIANTS["int4-vdq"]) and _current(cached({"decoder": 128}), VARIANTS["int4-vdq"])
    assert _current(cached(32), VARIANTS["int8"]) and _current(cached(32), VARIANTS["trt-int4"])
    assert _current(cached(256), VARIANTS["int4-b256"])  # --block-size 256: every quantized graph
    assert not _current(cached({"decoder": 128, "vision_encoder": 32}), VARIANTS["int4-b256"])
    assert _current(cached(None), VARIANTS["fp32"])
