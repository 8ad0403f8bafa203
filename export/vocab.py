"""The real Qwen2 vocabulary, built offline: dashscope's wheel ships `qwen.tiktoken` (151,643 BPE ranks).

The wheel is fetched with `pip download --no-deps` (dashscope itself is never installed), checked
against a pinned sha256, and converted once into a Hugging Face tokenizer.json that is cached.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from qwen2vl_edge.runtime.artifact import sha256_file

DASHSCOPE_VERSION = "2.0.2"
DASHSCOPE_WHEEL_SHA256 = "0602d1800f7433bdb7953560986eaf5146454ed3988636c0a91963ba24e74258"
TIKTOKEN_MEMBER = "dashscope/resources/qwen.tiktoken"
TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
NUM_RANKS = 151643

# dashscope/tokenizers/qwen_tokenizer.py: Qwen's pre-tokenisation (single digits, unlike cl100k)
PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen2-VL's added tokens, from id 151643 on, in order.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)


def cache_dir() -> Path:
    d = Path(os.environ.get("QWEN2VL_EDGE_CACHE", Path.home() / ".cache" / "qwen2vl-edge"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def tiktoken_file() -> Path:
    """qwen.tiktoken, extracted from the pinned dashscope wheel (downloaded once, cached)."""
    target = cache_dir() / "qwen.tiktoken"
    if target.is_file() and sha256_file(target) == TIKTOKEN_SHA256:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "-d", tmp, f"dashscope=={DASHSCOPE_VERSION}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("dashscope-*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download dashscope=={DASHSCOPE_VERSION} (the source of Qwen's vocabulary) from the "
                f"package index: {result.stderr.strip()[-500:]}"
            )
        if sha256_file(wheels[0]) != DASHSCOPE_WHEEL_SHA256:
            raise RuntimeError(f"{wheels[0].name} does not match the pinned sha256 {DASHSCOPE_WHEEL_SHA256}")
        with zipfile.ZipFile(wheels[0]) as z, z.open(TIKTOKEN_MEMBER) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    if sha256_file(target) != TIKTOKEN_SHA256:
        target.unlink()
        raise RuntimeError(f"{TIKTOKEN_MEMBER} in the dashscope wheel does not match the pinned sha256")
    return target


def tokenizer_json() -> Path:
    """Cached tokenizer.json with the real Qwen2 vocabulary and Qwen2-VL's special tokens."""
    target = cache_dir() / f"qwen2-tokenizer-{TIKTOKEN_SHA256[:12]}.json"
    if target.is_file():
        return target
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(tiktoken_file()), pattern=PRETOKENIZE_PATTERN).converted()
    tok.normalizer = normalizers.NFC()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    if tok.get_vocab_size() != NUM_RANKS + len(SPECIAL_TOKENS) or tok.token_to_id("<|video_pad|>") != 151656:
        raise RuntimeError("converted Qwen2 vocabulary has unexpected size or special-token ids")
    tmp = target.with_suffix(".tmp")
    tok.save(str(tmp))
    tmp.replace(target)
    return target
