"""OpenVINO GenAI's VLMPipeline measured as one benchmark system, in the OpenVINO peer's own python.

    PEERS/openvino/venv/bin/python benchmarks/peers/openvino_worker.py SPEC.json OUT.json

Imports nothing of qwen2vl-edge but benchmarks/worker.py (pure Python), which runs the scenarios exactly as
for our systems. Fairness: INFERENCE_NUM_THREADS = the bench's thread count; the paged-attention scheduler
GenAI picks on a CPU, with prefix caching off (its default turns it on, and a repeated prompt would then skip
its prefill); greedy, exactly `new_tokens` new tokens.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__:
    from .. import worker
else:  # run by the peer's python, where qwen2vl-edge is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import worker


def split_conversation(conversation) -> tuple[str, list[str], list[list[str]]]:
    """(text, image paths, videos as frame paths) of a one-turn user conversation.

    GenAI puts the images and videos before the text, as every benchmark scenario does."""
    (turn,) = conversation
    content = turn["content"]
    if isinstance(content, str):
        return content, [], []
    text = "".join(c["text"] for c in content if c["type"] == "text")
    images = [c["image"] for c in content if c["type"] == "image"]
    videos = [c["video"] for c in content if c["type"] == "video"]
    return text, images, videos


class OpenVINO:
    def __init__(self, model_dir: str, threads: int):
        import numpy as np
        import openvino as ov
        import openvino_genai
        from PIL import Image

        self.np, self.ov, self.Image = np, ov, Image
        scheduler = openvino_genai.SchedulerConfig()
        scheduler.max_num_batched_tokens = 2**64 - 1  # GenAI's latency-oriented default: no prefill split
        scheduler.enable_prefix_caching = False
        self.pipe = openvino_genai.VLMPipeline(model_dir, "CPU", scheduler_config=scheduler,
                                               INFERENCE_NUM_THREADS=threads)
        self.config = openvino_genai.GenerationConfig()
        self.config.do_sample = False
        core = ov.Core()
        self.settings = {"openvino": ov.__version__, "openvino_genai": openvino_genai.__version__,
                         "prefix_caching": False, "threads": threads,
                         **{k.lower(): core.get_property("CPU", k).get_type_name()
                            for k in ("INFERENCE_PRECISION_HINT", "KV_CACHE_PRECISION")}}

    def _tensor(self, paths: list[str]):
        frames = [self.np.asarray(self.Image.open(p).convert("RGB")) for p in paths]  # [H, W, 3] uint8 each
        return self.ov.Tensor(self.np.stack(frames))  # [N, H, W, 3]

    def run(self, conversation, new_tokens: int) -> dict:
        t0 = time.time()
        text, images, videos = split_conversation(conversation)
        pixels = [self._tensor([p]) for p in images]
        frames = [self._tensor(v) for v in videos]
        preprocess = time.time() - t0  # files decoded here; GenAI resizes inside its embedding step
        self.config.max_new_tokens = self.config.min_new_tokens = new_tokens
        try:
            result = self.pipe.generate(text, images=pixels, videos=frames, generation_config=self.config)
        except RuntimeError as e:
            raise worker.CannotRun(f"openvino_genai: {' '.join(str(e).split())[:200]}") from e
        m = result.perf_metrics
        ttft = preprocess + m.get_ttft().mean / 1e3
        # vision: GenAI's "prepare embeddings" (resize, patch embedding, the vision blocks and merger, text
        # embeddings), as its "vision encoding" times the patch embedding model alone
        vision = m.get_prepare_embeddings_duration().mean / 1e3
        return {"preprocess": preprocess, "vision": vision, "ttft": ttft,
                "decode_tok_s": 1e3 / m.get_tpot().mean, "e2e": time.time() - t0,
                "prompt_tokens": m.get_num_input_tokens(), "first_token_at": t0 + ttft}


if __name__ == "__main__":
    worker.main(sys.argv[1], sys.argv[2], make=lambda spec: OpenVINO(spec["model_dir"], spec["threads"]))
