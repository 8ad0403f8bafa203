"""TensorRT backend: the engines of `build-trt`, device memory and a stream through cuda-python.

Device buffers are allocated once for the engines' limits. The KV cache never leaves the GPU: the
decoder reads the past from one buffer set and writes the present into the other, and the two swap
every step. The merger writes its embeddings straight into the decoder's input buffer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from ..artifact import Artifact
from ..errors import ArtifactError, InputError
from .cuda import DeviceBuffer, cuda_call, cudart, gpu_identity
from .trt_profiles import DECODE, ENGINES, PREFILL, check_request, check_sidecar, limits_of

F32, I64 = 4, 8


@dataclass
class TrtCache:
    length: int  # tokens held (P)
    batch: int
    current: int  # buffer set holding the past: 0 or 1


@dataclass
class DeviceEmbeds:
    shape: tuple[int, int, int]  # [B, L, hidden], in TrtBackend.embeds


class TrtBackend:
    name = "tensorrt"

    def __init__(self, artifact: Artifact):
        try:
            import tensorrt as trt
        except ImportError:
            raise ArtifactError("backend='tensorrt' needs TensorRT: pip install 'qwen2vl-edge[trt]'") from None
        engines = artifact.manifest.get("engines")
        if not engines:
            raise ArtifactError(f"{artifact.dir} has no TensorRT engines: run `qwen2vl-edge build-trt {artifact.dir}`")
        gpu, cc = gpu_identity()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines, sidecars = {}, {}
        for name in ENGINES:
            sidecars[name] = json.loads((artifact.dir / engines[name]["sidecar"]).read_text())
            check_sidecar(sidecars[name], trt_version=trt.__version__, gpu_name=gpu, compute_capability=cc)
            self.engines[name] = runtime.deserialize_cuda_engine((artifact.dir / engines[name]["file"]).read_bytes())
            if self.engines[name] is None:
                raise ArtifactError(f"TensorRT could not deserialize {engines[name]['file']}: rebuild it")
        self.cfg, self.limits = artifact.config, limits_of(sidecars["decoder"])
        self.hidden_size = self.cfg.text.hidden_size
        self.graph_seconds = None  # execute_async_v3 returns before the GPU is done
        self.stream = cuda_call(cudart().cudaStreamCreate())
        self.ctx = {name: self.engines[name].create_execution_context() for name in ("vision_encoder",
                                                                                     "embedding_merger")}
        for key, index in (("prefill", PREFILL), ("decode", DECODE)):
            self.ctx[key] = self.engines["decoder"].create_execution_context()
            self.ctx[key].set_optimization_profile_async(index, self.stream)
        self._allocate()

    def _allocate(self) -> None:
        lim, t, v = self.limits, self.cfg.text, self.cfg.vision
        B, kv_bytes = lim.max_batch, lim.max_batch * t.num_key_value_heads * lim.max_context * t.head_dim * F32
        self.kv = [[DeviceBuffer.alloc(kv_bytes) for _ in range(2 * t.num_hidden_layers)] for _ in range(2)]
        self.embeds = DeviceBuffer.alloc(B * lim.max_prompt * t.hidden_size * F32)
        self.ids = DeviceBuffer.alloc(B * lim.max_prompt * I64)
        self.feats = DeviceBuffer.alloc(lim.max_prompt * t.hidden_size * F32)
        self.mask = DeviceBuffer.alloc(B * lim.max_context * I64)
        self.pos = DeviceBuffer.alloc(3 * B * lim.max_prompt * I64)
        self.logits = DeviceBuffer.alloc(B * t.vocab_size * F32)
        frames, patches = max(1, lim.max_frames // v.temporal_patch_size), lim.max_image_tokens * v.spatial_merge_size ** 2
        self.pixels = DeviceBuffer.alloc(frames * patches * v.patch_dim * F32)
        self.cos = DeviceBuffer.alloc(patches * v.head_dim * F32)
        self.sin = DeviceBuffer.alloc(patches * v.head_dim * F32)
        self.vision_out = DeviceBuffer.alloc(frames * lim.max_image_tokens * t.hidden_size * F32)

    def _run(self, ctx, shapes: dict, addresses: dict) -> None:
        for name, shape in shapes.items():
            ctx.set_input_shape(name, tuple(int(d) for d in shape))
        for name, buf in addresses.items():
            ctx.set_tensor_address(name, buf.ptr)
        if not ctx.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT execution failed")

    def check_request(self, inputs: dict, max_new_tokens: int) -> None:
        grids = [tuple(int(x) for x in g) for key in ("image_grid_thw", "video_grid_thw") for g in inputs.get(key, [])]
        check_request(self.limits, self.cfg, batch=inputs["input_ids"].shape[0],
                      prompt_len=inputs["input_ids"].shape[1], max_new_tokens=max_new_tokens, image_grids=grids)

    def vision(self, pixel_values, rotary_cos, rotary_sin):
        F, S, _ = pixel_values.shape
        for buf, array in ((self.pixels, pixel_values), (self.cos, rotary_cos), (self.sin, rotary_sin)):
            buf.upload(np.asarray(array, np.float32), self.stream)
        self._run(self.ctx["vision_encoder"], {"pixel_values": pixel_values.shape, "rotary_cos": rotary_cos.shape,
                                               "rotary_sin": rotary_sin.shape},
                  {"pixel_values": self.pixels, "rotary_cos": self.cos, "rotary_sin": self.sin,
                   "image_embeds": self.vision_out})
        m2 = self.cfg.vision.spatial_merge_size ** 2
        return self.vision_out.download((F, S // m2, self.hidden_size), np.float32, self.stream)

    def merge(self, input_ids, vision_embeds) -> DeviceEmbeds:
        self.ids.upload(input_ids.astype(np.int64), self.stream)
        if len(vision_embeds):
            self.feats.upload(vision_embeds.astype(np.float32), self.stream)
        self._run(self.ctx["embedding_merger"], {"input_ids": input_ids.shape, "vision_embeds": vision_embeds.shape},
                  {"input_ids": self.ids, "vision_embeds": self.feats, "inputs_embeds": self.embeds})
        return DeviceEmbeds((*input_ids.shape, self.hidden_size))

    def new_cache(self, batch: int, reserve: int = 0) -> TrtCache:  # buffers sized at engine limits
        return TrtCache(0, batch, 0)

    def reserve(self, cache: TrtCache, positions: int) -> TrtCache:
        """Engine buffers are fixed at --max-context: a chat session's next turn must fit them."""
        if positions > self.limits.max_context:
            raise InputError(f"the chat session needs {positions} positions, over the engines' --max-context "
                             f"{self.limits.max_context}: reset() the session or rebuild with a larger --max-context")
        return cache

    def decode(self, inputs_embeds: DeviceEmbeds, attention_mask, position_ids, cache: TrtCache):
        B, L, H = inputs_embeds.shape
        P, t = cache.length, self.cfg.text
        self.mask.upload(attention_mask.astype(np.int64), self.stream)
        self.pos.upload(position_ids.astype(np.int64), self.stream)
        shapes = {"inputs_embeds": (B, L, H), "attention_mask": attention_mask.shape, "position_ids": position_ids.shape}
        addresses = {"inputs_embeds": self.embeds, "attention_mask": self.mask, "position_ids": self.pos,
                     "logits": self.logits}
        past, present = self.kv[cache.current], self.kv[1 - cache.current]
        for i in range(t.num_hidden_layers):
            for j, kind in enumerate(("key", "value")):
                shapes[f"past_key_values.{i}.{kind}"] = (B, t.num_key_value_heads, P, t.head_dim)
                addresses[f"past_key_values.{i}.{kind}"] = past[2 * i + j]
                addresses[f"present.{i}.{kind}"] = present[2 * i + j]
        self._run(self.ctx["prefill" if P == 0 else "decode"], shapes, addresses)
        logits = self.logits.download((B, t.vocab_size), np.float32, self.stream)
        return logits, TrtCache(P + L, B, 1 - cache.current)
