"""Conversations -> the model inputs transformers' Qwen2VLProcessor produces, plus M-RoPE positions."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from . import chat
from .config import ModelConfig, load_config
from .errors import ArtifactError, InputError
from .media import load_image
from .preprocess import PreprocessorConfig, process_image, process_video_timed
from .rope import get_rope_index, token_types

IMAGE_OPTIONS = ("min_pixels", "max_pixels", "resized_height", "resized_width")
VIDEO_OPTIONS = IMAGE_OPTIONS + ("fps", "nframes", "total_pixels", "video_start", "video_end", "sample_fps")


@dataclass(frozen=True)
class SpecialTokens:
    image_pad: str
    video_pad: str
    pad_id: int | None  # tokenizer_config.json's pad_token; None: the tokenizer has none
    vision_start: str | None = None  # frame-timestamp families wrap each frame of a video in these
    vision_end: str | None = None


def _side_file(path: Path, parse, what: str | None = None):
    """parse(path), any failure an ArtifactError naming the file (tokenizers raises plain Exception)."""
    try:
        return parse(path)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named, never swallowed
        raise ArtifactError(f"{what or path} is damaged or unreadable ({type(e).__name__}: {e}): restore it from the "
                            "checkpoint or re-export the artifact") from None


def _special_tokens(tokenizer: Tokenizer, directory: Path, config: ModelConfig) -> SpecialTokens:
    image_pad = tokenizer.id_to_token(config.image_token_id)
    video_pad = tokenizer.id_to_token(config.video_token_id)
    if image_pad is None or video_pad is None:
        raise ArtifactError(f"tokenizer.json in {directory} lacks the image/video token ids of config.json")
    start, end = (None if i is None else tokenizer.id_to_token(i)
                  for i in (config.vision_start_token_id, config.vision_end_token_id))
    if config.family.frame_timestamps and (start is None or end is None):
        raise ArtifactError(f"{directory}: a {config.model_type} prompt wraps each video frame in the vision start "
                            "and end tokens, but config.json's vision_start_token_id / vision_end_token_id are "
                            "missing or not in tokenizer.json: restore them from the checkpoint")
    pad_id = None
    tc = directory / "tokenizer_config.json"
    if tc.is_file():
        pad = _side_file(tc, lambda p: json.loads(p.read_text()).get("pad_token"))
        pad = pad.get("content") if isinstance(pad, dict) else pad
        pad_id = tokenizer.token_to_id(pad) if isinstance(pad, str) and pad else None
    return SpecialTokens(image_pad, video_pad, pad_id, start, end)


def empty_segment(ids: list[int] | None = None) -> dict:
    """A segment (Processor.segment's dict) with no vision items."""
    return {"ids": list(ids or []), "pixels": {"image": [], "video": []}, "grids": {"image": [], "video": []},
            "second_per_grid_ts": [], "image_sizes": [], "video_timestamps": []}


def is_batch(conversations: Any) -> bool:
    return isinstance(conversations, (list, tuple)) and len(conversations) > 0 and isinstance(
        conversations[0], (list, tuple))


class Processor:
    """`Processor.from_pretrained(dir)(conversations)` -> dict of numpy arrays named as transformers names them."""

    def __init__(self, tokenizer: Tokenizer, template, preprocessor: PreprocessorConfig,
                 config: ModelConfig, special: SpecialTokens):
        self.tokenizer = tokenizer
        self.template = template  # compiled (chat.compile_template)
        self.preprocessor = preprocessor
        self.config = config
        self.special = special

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Processor":
        d = Path(path)
        config = load_config(d)
        if not (d / "tokenizer.json").is_file():
            raise ArtifactError(f"{d} has no tokenizer.json")
        tokenizer = _side_file(d / "tokenizer.json", lambda p: Tokenizer.from_file(str(p)))
        pp = _side_file(d, PreprocessorConfig.from_file,
                        f"{d / 'video_preprocessor_config.json'} or preprocessor_config.json")
        if pp.merge_size != config.vision.spatial_merge_size or pp.patch_size != config.vision.patch_size:
            raise ArtifactError(f"{d}: preprocessor_config.json disagrees with config.json on patch/merge size")
        template = _side_file(d, lambda p: chat.compile_template(chat.find_template(p, config.model_type)),
                              f"the chat template of {d} (chat_template.jinja, .json or tokenizer_config.json)")
        return cls(tokenizer, template, pp, config, _special_tokens(tokenizer, d, config))

    # -- vision -------------------------------------------------------------------------------

    def _image(self, item: dict, out: dict) -> None:
        image = load_image(chat.image_source(item))
        patches, grid = process_image(image, preprocessor=self.preprocessor,
                                      **{k: item[k] for k in IMAGE_OPTIONS if k in item})
        out["pixels"]["image"].append(patches)
        out["grids"]["image"].append(grid)
        out["image_sizes"].append((image.width, image.height))  # boxes map back to these pixels

    def _video(self, item: dict, out: dict, max_tokens: int) -> None:
        opts = {k: item[k] for k in VIDEO_OPTIONS if k in item}
        patches, grid, timestamps, rate = process_video_timed(item["video"], preprocessor=self.preprocessor,
                                                              max_tokens=max_tokens, **opts)
        out["pixels"]["video"].append(patches)
        out["grids"]["video"].append(grid)
        out["video_timestamps"].append(timestamps)
        if not self.config.family.frame_timestamps:  # Qwen3-VL's processor has no second_per_grid_ts
            out["second_per_grid_ts"].append(self.preprocessor.temporal_patch_size / rate)  # as transformers'

    # -- text ---------------------------------------------------------------------------------

    def _frames_text(self, grid: tuple[int, int, int], timestamps: list[float]) -> str:
        """A video as Qwen3VLProcessor writes it: per temporal group, "<t seconds>" then the group's pads between
        vision start and end. t is the mean time of the group's first and last frame (the last frame repeated
        where the group is short), as its _calculate_timestamps averages them. A file's times count from its start
        (a clip cut by video_start too), as qwen-vl-utils' decord / torchcodec readers give the frame indices."""
        tps, sp = self.preprocessor.temporal_patch_size, self.special
        times = list(timestamps) + [timestamps[-1]] * (-len(timestamps) % tps)
        groups = [(times[i] + times[i + tps - 1]) / 2 for i in range(0, len(times), tps)]
        pads = sp.video_pad * (int(grid[1] * grid[2]) // self.preprocessor.merge_size ** 2)
        return "".join(f"<{t:.1f} seconds>{sp.vision_start}{pads}{sp.vision_end}" for t in groups)

    def _expand(self, text: str, kind: str, grids: list[tuple[int, int, int]], timestamps: list[list[float]]) -> str:
        """Each placeholder of `kind` -> its tokens. Frame-timestamp families write a video frame by frame
        (`timestamps`: each video's sampled frames' seconds), in place of the template's whole
        vision start + pad + vision end."""
        pad = self.special.image_pad if kind == "image" else self.special.video_pad
        timed = kind == "video" and self.config.family.frame_timestamps
        if timed:  # the template's wrapper, collapsed to a bare pad as Qwen3VLProcessor does
            text = text.replace(f"{self.special.vision_start}{pad}{self.special.vision_end}", pad)
        parts = text.split(pad)
        if len(parts) - 1 != len(grids):
            raise InputError(
                f"the prompt has {len(parts) - 1} {kind} placeholder(s) but the conversation has {len(grids)} "
                f"{kind} item(s): each {kind} needs exactly one placeholder (do not type {pad} in text)"
            )
        merge2 = self.preprocessor.merge_size ** 2
        out = [parts[0]]
        for i, (grid, rest) in enumerate(zip(grids, parts[1:])):
            out.append(self._frames_text(grid, timestamps[i]) if timed else pad * (int(np.prod(grid)) // merge2))
            out.append(rest)
        return "".join(out)

    def prompt(self, conversation: list[dict], add_vision_id: bool = False,
               add_generation_prompt: bool = True) -> str:
        """The rendered chat template of one conversation (placeholders not yet expanded)."""
        return chat.render(self.template, chat.validate(conversation), add_vision_id=add_vision_id,
                           add_generation_prompt=add_generation_prompt)

    def segment(self, text: str, items: list[tuple[str, dict]], max_tokens: int | None = None) -> dict:
        """Rendered text + its vision items in order -> {"ids": [int] (the pieces between chat.BOUNDARY marks
        tokenised apart), "pixels": {kind: [patches]},
        "grids": {kind: [(t, h, w)]}, "second_per_grid_ts": [s] (per video), "image_sizes": [(w, h)],
        "video_timestamps": [[s]]}.
        `max_tokens`: a video file whose token count (read from its metadata) exceeds it fails before decoding."""
        limit = self.config.text.max_position_embeddings if max_tokens is None else max_tokens
        out = empty_segment()
        for kind, item in items:
            self._image(item, out) if kind == "image" else self._video(item, out, limit)
        for kind in ("image", "video"):
            text = self._expand(text, kind, out["grids"][kind], out["video_timestamps"])
        out["ids"] = [i for piece in text.split(chat.BOUNDARY) for i in self.tokenizer.encode(piece).ids]
        return out

    def arrays(self, ids: list[list[int]], segments: list[dict]) -> dict[str, np.ndarray]:
        """Left-padded rows + the segments' pixels -> the arrays transformers' processor returns, plus M-RoPE."""
        L = max(len(x) for x in ids)
        if self.special.pad_id is None and any(len(x) < L for x in ids):
            raise InputError("this tokenizer has no pad_token (tokenizer_config.json): batch conversations of equal "
                             "token length, or send them one at a time")
        input_ids = np.full((len(ids), L), self.special.pad_id or 0, np.int64)  # 0 only where nothing pads
        attention_mask = np.zeros((len(ids), L), np.int64)
        for b, x in enumerate(ids):  # left padding, as generation needs
            input_ids[b, L - len(x):] = x
            attention_mask[b, L - len(x):] = 1
        out: dict = {"input_ids": input_ids, "attention_mask": attention_mask}
        for kind, pixels_key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                           ("video", "pixel_values_videos", "video_grid_thw")):
            pixels = [p for seg in segments for p in seg["pixels"][kind]]
            if pixels:
                out[pixels_key] = np.concatenate(pixels)
                out[grid_key] = np.asarray([g for seg in segments for g in seg["grids"][kind]], np.int64)
        if "video_grid_thw" in out and not self.config.family.frame_timestamps:
            out["second_per_grid_ts"] = np.asarray([s for seg in segments for s in seg["second_per_grid_ts"]],
                                                   np.float32)
        out["mm_token_type_ids"] = token_types(input_ids, self.config)
        out["position_ids"], out["rope_deltas"] = get_rope_index(
            input_ids, attention_mask, out.get("image_grid_thw"), out.get("video_grid_thw"), self.config,
            out.get("second_per_grid_ts"))
        return out

    def encode(self, conversations: Any, add_vision_id: bool = False,
               max_tokens: int | None = None) -> tuple[dict[str, np.ndarray], list[dict]]:
        """-> (the arrays of __call__, per row {"image_sizes": [(w, h)], "video_timestamps": [[seconds]]})."""
        batch = list(conversations) if is_batch(conversations) else [conversations]
        if not batch:
            raise InputError("no conversation given")
        segments = [self.segment(self.prompt(conv, add_vision_id), chat.vision_items(conv), max_tokens)
                    for conv in batch]
        meta = [{"image_sizes": seg["image_sizes"], "video_timestamps": seg["video_timestamps"]} for seg in segments]
        return self.arrays([seg["ids"] for seg in segments], segments), meta

    def __call__(self, conversations: Any, add_vision_id: bool = False) -> dict[str, np.ndarray]:
        return self.encode(conversations, add_vision_id)[0]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
