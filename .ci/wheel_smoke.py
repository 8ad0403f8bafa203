"""CI: the device install, as a user makes it. Run by a venv that holds only the wheel and its base
dependencies: load a tiny exported artifact, generate from an image, and check that neither torch nor
transformers is installed, let alone imported."""

import importlib.util
import sys

import numpy as np

from qwen2vl_edge.runtime import Qwen2VLPipeline

TORCH_SIDE = ("torch", "transformers")


def main(artifact: str) -> None:
    installed = [name for name in TORCH_SIDE if importlib.util.find_spec(name) is not None]
    assert not installed, f"the base install pulled in {installed}"
    image = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)   # [H, W, RGB]
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "Describe this image."}]}]
    with Qwen2VLPipeline.load(artifact) as pipe:
        res = pipe.generate(messages, max_new_tokens=8, do_sample=False)
    assert res.usage["completion_tokens"] > 0, res.usage
    imported = [name for name in TORCH_SIDE if name in sys.modules]
    assert not imported, f"the runtime imported {imported}"
    print(f"wheel smoke: {res.usage['completion_tokens']} tokens from an image, no torch: {res.text!r}")


if __name__ == "__main__":
    main(sys.argv[1])
