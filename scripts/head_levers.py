#!/usr/bin/env python
"""Head training on precomputed base features: the levers' probe, and the shipped head's trainer.

eesd-train distill runs the whole base for every step, about 225 tok/s on this CPU; here the
base runs once (`features`: layer-4 states, final states after
the model's norm, the base's argmax, bf16) and each variant trains only the head (`train`),
a 0.6-epoch run in 10-15 minutes. Variants: E head layers (initialised from base layers
4..4+E), and `--fin 1`, which adds a zero-initialised projection of the base's final state
of the previous position to the head's input: the verifier computes that state for every
committed position and for the first draft of a round. Reported: teacher-forced first-draft
top-k agreement with the base's argmax on held-out answer tokens (k = 1..8).

usage (project root, venv):
  python scripts/head_levers.py features data/teacher/smollm2-135m/sharegpt-ref F/ref.pt 384 [STRIDE [f32|bf16]]
  python scripts/head_levers.py features data/teacher/smollm2-135m/heldout-bf16 F/heldout.pt 512 [1 [f32|bf16]]
  python scripts/head_levers.py train --train F/ref.pt --eval F/heldout.pt --epochs 0.6 [--layers 2] [--fin 1] [--export DIR]

`--export` writes an eesd head folder; `just train-features` chains these steps with the
product's evaluation (`eesd-train distill --eval-only --export`), which ships the head with its
metrics. The draft vocabulary is the committed head's (the same base and corpus).
"""
import argparse, glob, json, math, sys, time
import torch, torch.nn as nn, torch.nn.functional as F

MODEL = "data/models/smollm2-135m-instruct"
HEAD = "data/heads/smollm2-135m-instruct/head.safetensors"
# The probe's parameter names against the eesd head format's (HF's layer names).
LAYER_NAMES = dict(n1="input_layernorm", n2="post_attention_layernorm", q="self_attn.q_proj",
                   k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
                   g="mlp.gate_proj", u="mlp.up_proj", d="mlp.down_proj")


def teacher_rows(src, stride=1, columns=("id", "prompt_ids", "response_ids")):
    """Every stride-th conversation of a teacher-data folder, in corpus order: the subset
    `features` computes (and `train --exclude` skips)."""
    import pyarrow.parquet as pq
    rows = []
    for f in sorted(glob.glob(src + "/*.parquet")):
        rows += pq.read_table(f, columns=list(columns)).to_pylist()
    return rows[::stride]


def head_tensors(head, fin):
    """The head's parameters under their eesd head-format names (what export writes, --init reads)."""
    out = {}
    for j, l in enumerate(head.layers):
        for short, hf in LAYER_NAMES.items():
            m = getattr(l, short)
            out[f"layers.{j}.{hf}.weight"] = m.g if short.startswith("n") else m
    out["norm.weight"] = head.nf.g
    if fin:
        out["final_state.norm.weight"] = head.fn.g
        out["final_state.proj.weight"] = head.fp
    return out


def features(src, out, maxseq, stride=1, dtype="bf16"):
    from transformers import AutoModelForCausalLM
    # f32 runs faster than bf16 on CPUs without AMX; the states are stored in bf16 either way.
    m = AutoModelForCausalLM.from_pretrained(MODEL, dtype=dict(bf16=torch.bfloat16, f32=torch.float32)[dtype]).eval()
    rows = teacher_rows(src, stride)  # a subset spread over the corpus
    seqs = []
    for r in rows:
        ids = (list(r["prompt_ids"]) + list(r["response_ids"]))[:maxseq]
        if len(r["prompt_ids"]) < len(ids) - 1:
            seqs.append((r["id"], ids, len(r["prompt_ids"])))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][1]))
    res, t0, done, i = [None] * len(seqs), time.time(), 0, 0
    with torch.no_grad():
        while i < len(order):
            batch = order[i:i + max(1, 4096 // len(seqs[order[i]][1]))]
            i += len(batch)
            L = max(len(seqs[j][1]) for j in batch)
            x = torch.zeros(len(batch), L, dtype=torch.long)  # right padding: causal, harmless
            for k, j in enumerate(batch):
                x[k, :len(seqs[j][1])] = torch.tensor(seqs[j][1])
            o = m(x, output_hidden_states=True)
            for k, j in enumerate(batch):
                n = len(seqs[j][1])
                res[j] = dict(id=seqs[j][0], ids=torch.tensor(seqs[j][1]), P=seqs[j][2],
                              h4=o.hidden_states[4][k, :n].to(torch.bfloat16), fin=o.hidden_states[-1][k, :n].to(torch.bfloat16),
                              arg=o.logits[k, :n].argmax(-1))
                done += n
            print(f"{i}/{len(seqs)} sequences, {done} tokens, {done / (time.time() - t0):.0f} tok/s", flush=True)
    torch.save(res, out)


def train(a):
    from safetensors.torch import load_file
    torch.set_num_threads(a.threads); torch.manual_seed(0)
    N, H, NH, NKV, HD, V = 4, 576, 9, 3, 64, 8192
    W = load_file(MODEL + "/model.safetensors")
    tr = []
    for p in a.train: tr += torch.load(p, mmap=True)
    if a.exclude:
        # The conversations `features DIR ... STRIDE` takes (those a head was trained on).
        src, stride = a.exclude.rsplit(":", 1)
        seen = {r["id"] for r in teacher_rows(src, int(stride), columns=("id",))}
        tr = [r for r in tr if r["id"] not in seen]
    ev = torch.load(a.eval)
    vocab = load_file(HEAD)["draft_vocab"]  # the committed head's 8,192-token draft vocabulary
    remap = torch.full((49152,), -1, dtype=torch.long); remap[vocab] = torch.arange(V)
    def w(n): return W[n].float().clone()
    class RMS(nn.Module):
        def __init__(s, g): super().__init__(); s.g = nn.Parameter(g)
        def forward(s, x): return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * s.g
    def rope(T):
        inv = 1.0 / (100000 ** (torch.arange(0, HD, 2).float() / HD)); f = torch.outer(torch.arange(T).float(), inv)
        e = torch.cat([f, f], -1); return e.cos(), e.sin()
    def rot(x, c, s):
        x1, x2 = x[..., :HD // 2], x[..., HD // 2:]; return x * c + torch.cat([-x2, x1], -1) * s
    class Layer(nn.Module):
        def __init__(s, n):
            super().__init__(); p = f"model.layers.{n}."
            s.n1 = RMS(w(p + "input_layernorm.weight")); s.n2 = RMS(w(p + "post_attention_layernorm.weight"))
            s.q = nn.Parameter(w(p + "self_attn.q_proj.weight")); s.k = nn.Parameter(w(p + "self_attn.k_proj.weight"))
            s.v = nn.Parameter(w(p + "self_attn.v_proj.weight")); s.o = nn.Parameter(w(p + "self_attn.o_proj.weight"))
            s.g = nn.Parameter(w(p + "mlp.gate_proj.weight")); s.u = nn.Parameter(w(p + "mlp.up_proj.weight")); s.d = nn.Parameter(w(p + "mlp.down_proj.weight"))
        def forward(s, h, c, si):
            B, T, _ = h.shape; x = s.n1(h)
            q = rot((x @ s.q.T).view(B, T, NH, HD).transpose(1, 2), c, si)
            k = rot((x @ s.k.T).view(B, T, NKV, HD).transpose(1, 2), c, si); v = (x @ s.v.T).view(B, T, NKV, HD).transpose(1, 2)
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            h = h + att.transpose(1, 2).reshape(B, T, NH * HD) @ s.o.T
            y = s.n2(h); return h + (F.silu(y @ s.g.T) * (y @ s.u.T)) @ s.d.T
    class Head(nn.Module):
        def __init__(s):
            super().__init__()
            s.layers = nn.ModuleList([Layer(N + i) for i in range(a.layers)])
            s.nf = RMS(w("model.norm.weight")); s.lm = w("model.embed_tokens.weight")[vocab]
            if a.fin:
                s.fn = RMS(torch.ones(H)); s.fp = nn.Parameter(torch.zeros(H, H))
        def forward(s, h, fin):
            B, T, _ = h.shape; c, si = rope(T)
            if a.fin:
                prev = torch.cat([torch.zeros_like(fin[:, :1]), fin[:, :-1]], 1)
                h = h + s.fn(prev) @ s.fp.T
            for l in s.layers: h = l(h, c, si)
            return s.nf(h) @ s.lm.T
    head = Head()
    if a.init:
        # Continue from a trained head (an eesd head folder): every layer it has, the norm and
        # the final-state input; the draft vocabulary must be the same. Layers past its own
        # (growing E) start from their base layer with zeroed output projections (o, down):
        # an identity block, so the grown head starts as exactly the head it grew from.
        t = load_file(a.init + "/head.safetensors")
        assert torch.equal(t["draft_vocab"], vocab), "--init has another draft vocabulary"
        have = len({k.split(".")[1] for k in t if k.startswith("layers.")})
        assert have <= a.layers, f"--init has {have} layers, more than --layers {a.layers}"
        with torch.no_grad():
            for name, p in head_tensors(head, a.fin).items():
                if not name.startswith("layers.") or int(name.split(".")[1]) < have:
                    p.copy_(t[name].float())
            for l in head.layers[have:]:
                l.o.zero_(); l.d.zero_()
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    def batch(items):
        T = max(len(r["ids"]) for r in items); B = len(items)
        h = torch.zeros(B, T, H); f = torch.zeros(B, T, H); tgt = torch.full((B, T), -1, dtype=torch.long)
        for k, r in enumerate(items):
            n = len(r["ids"]); h[k, :n] = r["h4"].float(); f[k, :n] = r["fin"].float()
            t = remap[r["arg"]].clone(); t[:r["P"] - 1] = -1; tgt[k, :n] = t
        return h, f, tgt
    def evaluate():
        K = 8; hits = {}; tot = {}
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16 == 1):
            for r in ev:
                h, f, _ = batch([r]); s = head(h, f)[0].float()
                sl = slice(r["P"] - 1, len(r["ids"]) - 1)
                top = vocab[s[sl].topk(K, -1).indices]; tt = r["arg"][sl]
                for key in (r["id"].split("/")[0], "all"):
                    c = (top == tt[:, None]).cumsum(-1).clamp(max=1).sum(0).double()
                    hits[key] = hits.get(key, 0) + c; tot[key] = tot.get(key, 0) + len(tt)
        return {k: [round(v, 4) for v in (hits[k] / tot[k]).tolist()] for k in hits}
    steps = int(a.epochs * len(tr) / a.bs)
    print(f"layers={a.layers} fin={a.fin} train_seqs={len(tr)} steps={steps} untrained={evaluate()['all'][:4]}", flush=True)
    g = torch.Generator().manual_seed(0); perm = torch.cat([torch.randperm(len(tr), generator=g) for _ in range(math.ceil(a.epochs) + 1)]).tolist()
    t0 = time.time(); log = []
    for step in range(1, steps + 1):
        lr = a.lr * min(1, step / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for pg in opt.param_groups: pg["lr"] = lr
        h, f, tgt = batch([tr[j] for j in perm[(step - 1) * a.bs: step * a.bs]])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16 == 1):
            s = head(h, f)
        loss = F.cross_entropy(s.float().reshape(-1, V), tgt.reshape(-1), ignore_index=-1)
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
        if step % a.eval_every == 0 or step == steps:
            e = evaluate(); log.append(dict(step=step, loss=loss.item(), eval=e))
            print(f"step {step} loss {loss.item():.3f} all {e['all'][:4]} gsm {e['gsm8k'][0]} he {e['humaneval'][0]} mt {e['mtbench'][0]} ({time.time() - t0:.0f} s)", flush=True)
            if a.out: json.dump(dict(args=vars(a), log=log), open(a.out, "w"))
    if a.export:
        export(a, head, vocab, log)


def export(a, head, vocab, log):
    """Writes the trained head as an eesd head folder (head.safetensors in f16, head.json), the
    format eesd-train exports and eesd-infer loads; the spec's base fields come from the
    committed head, which shares the base and the draft vocabulary."""
    import os
    from safetensors.torch import save_file
    out = {k: v.detach().to(torch.float16).contiguous() for k, v in head_tensors(head, a.fin).items()}
    out["draft_vocab"] = vocab.contiguous()
    spec = json.load(open(HEAD.replace("head.safetensors", "head.json")))
    spec.update(head_layers=a.layers, final_state_input=bool(a.fin), init="exit-layer",
                step=log[-1]["step"], metrics=dict(probe_eval=log[-1]["eval"]),
                training=dict(trainer="scripts/head_levers.py", args=vars(a)))
    # The exit layer the weights were trained at, which eesd checks head.json against.
    out["exit_layer"] = torch.tensor([spec["exit_layer"]], dtype=torch.int64)
    os.makedirs(a.export, exist_ok=True)
    save_file(out, os.path.join(a.export, "head.safetensors"))
    json.dump(spec, open(os.path.join(a.export, "head.json"), "w"), indent=2)
    print(f"exported the head to {a.export}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "features":
        torch.set_num_threads(2)
        features(sys.argv[2], sys.argv[3], int(sys.argv[4]), *(int(x) if x.isdigit() else x for x in sys.argv[5:]))
        sys.exit(0)
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["train"])
    ap.add_argument("--train", nargs="+", required=True); ap.add_argument("--eval", required=True)
    ap.add_argument("--layers", type=int, default=1); ap.add_argument("--fin", type=int, default=0)
    ap.add_argument("--epochs", type=float, default=0.6); ap.add_argument("--bs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3); ap.add_argument("--eval-every", type=int, default=110)
    ap.add_argument("--out", default=None); ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--export", default=None, help="also write the head as an eesd head folder")
    ap.add_argument("--bf16", type=int, default=1, help="1: bf16 autocast (fast with AMX); 0: f32")
    ap.add_argument("--init", default=None, help="continue from this head folder (same vocabulary; as many layers or fewer)")
    ap.add_argument("--exclude", default=None, help="DIR:STRIDE: skip the conversations `features DIR OUT LEN STRIDE` takes")
    train(ap.parse_args())
