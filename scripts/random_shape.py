"""Write an HF LLaMA folder of a published shape with random bf16 weights, made on the GPU
(seconds, where transformers' CPU init of a 13B model takes minutes), with the tokenizer of
TOKENIZER_DIR (its vocabulary size replaces the shape's, so its ids fit the embedding).
For throughput checks on machines the real weights cannot reach.

usage: random_shape.py SHAPE TOKENIZER_DIR OUT_DIR      (SHAPE: llama2-7b, llama2-13b, tiny)
"""

import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40),
    # For trying this script where there is no GPU.
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4),
}

shape, tok_dir, out = sys.argv[1], sys.argv[2], sys.argv[3]
with open(os.path.join(tok_dir, "config.json")) as f:
    vocab = json.load(f)["vocab_size"]
cfg = dict(SHAPES[shape], architectures=["LlamaForCausalLM"], model_type="llama",
           vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-5,
           rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
           torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)
os.makedirs(out, exist_ok=True)
for f in os.listdir(tok_dir):
    if f not in ("config.json",) and not f.endswith(".safetensors"):
        shutil.copy(os.path.join(tok_dir, f), out)
with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(cfg, f, indent=1)

dev = "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator(device=dev).manual_seed(0)
h, i = cfg["hidden_size"], cfg["intermediate_size"]
def w(*s):
    return (torch.randn(*s, generator=g, device=dev) * 0.02).to(torch.bfloat16).cpu()
params, shard, index = 0, {}, {}
def flush(n):
    global shard
    name = f"model-{n:05d}.safetensors"
    save_file(shard, os.path.join(out, name), metadata={"format": "pt"})
    index.update({k: name for k in shard})
    shard = {}
ones = lambda: torch.ones(h, dtype=torch.bfloat16)
shard["model.embed_tokens.weight"] = w(vocab, h)
n = 0
for l in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{l}"
    for k, s in [("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (h, h)), ("self_attn.v_proj", (h, h)),
                 ("self_attn.o_proj", (h, h)), ("mlp.gate_proj", (i, h)), ("mlp.up_proj", (i, h)),
                 ("mlp.down_proj", (h, i))]:
        shard[f"{p}.{k}.weight"] = w(*s)
    shard[f"{p}.input_layernorm.weight"] = ones()
    shard[f"{p}.post_attention_layernorm.weight"] = ones()
    if (l + 1) % 8 == 0:
        flush(n)
        n += 1
shard["model.norm.weight"] = ones()
shard["lm_head.weight"] = w(vocab, h)
flush(n)
with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": index}, f)
print(f"random {shape}-shaped model (vocab {vocab}) -> {out}")
