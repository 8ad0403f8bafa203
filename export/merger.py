"""embedding_merger graph: token embeddings with vision features placed at the <|image_pad|> /
<|video_pad|> positions, row-major over the batch, in order of appearance. With DeepStack (Qwen3-VL) it also
outputs visual_index [B, L], where each position's feature came from (the decoder places the DeepStack features by
it)."""

from __future__ import annotations

import numpy as np

from .checkpoint import Checkpoint
from .graph import FLOAT, INT64, Graph
from .quantize import QuantSpec, gather_block_quantized

EMBED = "model.embed_tokens.weight"


def build_embedding_merger(g: Graph, ckpt: Checkpoint, quant: QuantSpec | None = None) -> None:
    """`quant`: the decoder's weight format; the table is then stored block-quantized, in the very bytes
    the tied lm_head's MatMulNBits reads."""
    cfg = ckpt.config
    H = cfg.text.hidden_size
    ids = g.input("input_ids", INT64, ["batch", "seq"])
    feats = g.input("vision_embeds", FLOAT, ["vision_tokens", H])
    if quant is not None:
        embeds = gather_block_quantized(g, ids, lambda: ckpt.get(EMBED), EMBED, quant)  # [B, L, H] fp32
    else:
        table = g.weight(EMBED, lambda: ckpt.get(EMBED), raw=True)
        embeds = g.op("Cast", g.op("Gather", table, ids), to=FLOAT)  # gathered rows cast, not the whole table
    is_vision = g.op("Or", g.op("Equal", ids, g.const(cfg.image_token_id)),
                     g.op("Equal", ids, g.const(cfg.video_token_id)))
    flags = g.op("Cast", is_vision, to=FLOAT)
    # 1-based index of each vision token among all vision tokens; 0 for text (row 0 = zeros below),
    # so M = 0 (text only, decode steps) needs no special case. CumSum runs in float because
    # TensorRT's CumSum takes no int64; counts stay exact far beyond any context (2^24).
    index = g.op("CumSum", g.op("Reshape", flags, g.const([-1])), g.const(0))
    index = g.op("Cast", g.op("Mul", g.op("Reshape", index, g.op("Shape", ids)), flags), to=INT64)
    padded = g.op("Concat", g.const(np.zeros((1, H)), np.float32), feats, axis=0)  # [M + 1, H]
    placed = g.op("Gather", padded, index)
    out = g.op("Where", g.op("Unsqueeze", is_vision, g.const([-1])), placed, embeds)
    g.output(out, "inputs_embeds", FLOAT, ["batch", "seq", H])
    if cfg.vision.deepstack_visual_indexes:
        g.output(index, "visual_index", INT64, ["batch", "seq"])
