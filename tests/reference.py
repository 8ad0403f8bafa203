"""The seed pipeline the runtime must reproduce: qwen-vl-utils, then transformers' Qwen2-VL / Qwen2.5-VL / Qwen3-VL
processors and models (the class the checkpoint's config.json names). qwen-vl-utils is called with the checkpoint's
patch size (`image_patch_size=16` for Qwen3-VL, as its model card does) and returns the videos' metadata.

Imported only by tests that need torch; everything here is the reference, nothing is ours.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np


@functools.lru_cache(maxsize=None)
def hf_processor(ckpt: str):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(ckpt)


@functools.lru_cache(maxsize=None)
def hf_image_processor(ckpt: str):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(ckpt)


@functools.lru_cache(maxsize=None)
def hf_video_processor(ckpt: str):
    """The family's video processor (Qwen3-VL's reads video_preprocessor_config.json)."""
    from transformers import AutoVideoProcessor

    return AutoVideoProcessor.from_pretrained(ckpt)


@functools.lru_cache(maxsize=None)
def patch_size(ckpt: str) -> int:
    """qwen-vl-utils' image_patch_size for this checkpoint: 14 (Qwen2-VL, Qwen2.5-VL) or 16 (Qwen3-VL)."""
    return json.loads((Path(ckpt) / "preprocessor_config.json").read_text())["patch_size"]


@functools.lru_cache(maxsize=None)
def hf_model(ckpt: str):
    import transformers

    architecture = json.loads((Path(ckpt) / "config.json").read_text())["architectures"][0]
    return getattr(transformers, architecture).from_pretrained(ckpt).eval()


def ref_image(ckpt: Path, item: dict) -> tuple[np.ndarray, np.ndarray]:
    """qwen-vl-utils fetch_image, then Qwen2VLImageProcessorPil from preprocessor_config.json."""
    from qwen_vl_utils.vision_process import fetch_image

    image = fetch_image(item, image_patch_size=patch_size(str(ckpt)))
    out = hf_image_processor(str(ckpt))(images=[image], return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"]


def ref_video(ckpt: Path, item: dict) -> tuple[np.ndarray, np.ndarray]:
    """qwen-vl-utils fetch_video, then Qwen2VLVideoProcessor (torchvision) with qwen-vl-utils' per-frame cap."""
    from qwen_vl_utils.vision_process import fetch_video

    video = fetch_video(item, image_patch_size=patch_size(str(ckpt)))
    out = hf_video_processor(str(ckpt))(videos=[video], return_tensors="np", do_sample_frames=False,
                                        cap_pixels_per_frame=True)
    return out["pixel_values_videos"], out["video_grid_thw"]


def vision_info(conversations: list, image_patch_size: int = 14) -> dict:
    """qwen-vl-utils' process_vision_info as the processor's keyword arguments: images, videos and the videos'
    metadata (Qwen2.5-VL's second_per_grid_ts comes from its sampled fps, Qwen3-VL's timestamps from its frame
    indices and fps; without it transformers assumes 24 fps)."""
    from qwen_vl_utils import process_vision_info

    images, videos = process_vision_info(conversations, return_video_metadata=True, image_patch_size=image_patch_size)
    metadata = None
    if videos is not None:
        videos, metadata = (list(x) for x in zip(*videos))
    return {"images": images, "videos": videos, "video_metadata": metadata,
            "videos_kwargs": {"do_sample_frames": False, "cap_pixels_per_frame": True}}


def ref_inputs(ckpt: Path, conversations: list, add_vision_id: bool = False) -> dict:
    """apply_chat_template + process_vision_info + processor, as the model cards do."""
    proc = hf_processor(str(ckpt))
    texts = [proc.apply_chat_template(c, tokenize=False, add_generation_prompt=True, add_vision_id=add_vision_id)
             for c in conversations]
    out = proc(text=texts, padding=True, padding_side="left", return_tensors="pt",
               **vision_info(conversations, patch_size(str(ckpt))))
    return dict(out)


def ref_rope_index(ckpt: Path, inputs: dict) -> tuple[np.ndarray, np.ndarray]:
    model = hf_model(str(ckpt))
    pos, deltas = model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs.get("image_grid_thw"), video_grid_thw=inputs.get("video_grid_thw"),
        second_per_grid_ts=inputs.get("second_per_grid_ts"), attention_mask=inputs["attention_mask"])
    return pos.numpy(), deltas.numpy()
