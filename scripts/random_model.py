"""Make an HF model folder with random weights from a folder holding only config and tokenizer
(for throughput checks on machines the real weights cannot reach).

usage: random_model.py SRC_DIR OUT_DIR
"""

import os
import shutil
import sys

import torch
from transformers import AutoConfig, LlamaForCausalLM

src, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
cfg = AutoConfig.from_pretrained(src)
model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(out, safe_serialization=True)
for f in os.listdir(src):
    if f != "config.json":
        shutil.copy(os.path.join(src, f), out)
print(f"random {sum(p.numel() for p in model.parameters())/1e6:.0f}M-parameter model -> {out}")
