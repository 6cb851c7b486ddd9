"""Golden fixtures for eesd-core: tiny random LLaMA checkpoints and transformers' logits on them.

Each case is written to crates/eesd-core/tests/fixtures/<case>/ as a normal HF folder
(config.json, model.safetensors) plus expected.safetensors:
  input_ids       [B, T] int64   row 1 is left-padded
  attention_mask  [B, T] int64   0 on padding
  logits          [B, T, V] f32  LlamaForCausalLM(input_ids, attention_mask, position_ids)
with position_ids = cumsum(mask) - 1 clamped at 0, the positions HF generate uses for left
padding. The cases cover MHA, GQA with an explicit head_dim, tied and untied heads, and
LLaMA-3 rope scaling. Re-run to regenerate: .venv/bin/python scripts/make_golden.py
"""

import json
import os

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "eesd-core", "tests", "fixtures")

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

CASES = {
    "mha_untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                       rope_theta=10000.0),
    "gqa_tied_headdim": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                             tie_word_embeddings=True, rope_theta=100000.0),
    "llama3_rope": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                        rope_theta=500000.0,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=16)),
}


def legacy_rope_spelling(path):
    """Rewrite `rope_parameters` as `rope_theta` + `rope_scaling`, as real LLaMA-3 folders have it,
    so the golden tests cover both spellings of the same settings."""
    with open(path) as f:
        cfg = json.load(f)
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)


def word_tokenizer(d, vocab_size):
    """A word-level tokenizer and chat template over the tiny vocabulary, so the CLI can be
    tested end to end on this model: `<unk> <s> </s>`, role words, then `w5`, `w6`, ..."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", "user", "assistant"]
    words += [f"w{i}" for i in range(len(words), vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    tok.save(os.path.join(d, "tokenizer.json"))
    template = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                "{% if add_generation_prompt %}<s> assistant {% endif %}")
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "chat_template": template}, f, indent=2)


def main():
    for i, (name, extra) in enumerate(CASES.items()):
        torch.manual_seed(1234 + i)
        cfg = LlamaConfig(**BASE, **extra)
        model = LlamaForCausalLM(cfg).float().eval()
        # Random init is small (std 0.02); widen it so logits differ clearly between tokens.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.2)
        d = os.path.join(OUT, name)
        model.save_pretrained(d, safe_serialization=True)
        t, pad = 40, 5
        ids = torch.randint(3, cfg.vocab_size, (2, t))
        mask = torch.ones(2, t, dtype=torch.long)
        mask[1, :pad] = 0
        ids[1, :pad] = 0
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
        save_file({"input_ids": ids.contiguous(), "attention_mask": mask.contiguous(),
                   "logits": logits.contiguous()}, os.path.join(d, "expected.safetensors"))
        if name == "mha_untied":
            word_tokenizer(d, cfg.vocab_size)
        if name == "llama3_rope":
            legacy_rope_spelling(os.path.join(d, "config.json"))
        print(f"{name}: {sum(p.numel() for p in model.parameters())} params -> {d}")


if __name__ == "__main__":
    main()
