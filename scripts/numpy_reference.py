#!/usr/bin/env python3
"""A second, independent implementation of fapool's model family in NumPy
(float64), reading a checkpoint as `fapool export-weights` writes it (or any
Llama-style folder: config.json and model.safetensors), for
`fapool verify --reference`:

    python3 scripts/numpy_reference.py DIR --lengths 9,9,20,20 --steps 4 --out ref.json

The model, written from its definition: token embedding (plus the
sinusoidal encoding of fapool_positions = "sinusoidal": dimension c of
position p is sin (even c) or cos (odd c) of p / 10000^(2 floor(c/2) / d));
per layer x += o(attn(rmsnorm(x))) and x += ffn(rmsnorm(x)); a final
RMSNorm and the LM head (the embedding when tied). Attention is causal, q
and k rotated by RoPE (Hugging Face's half-split pairs) unless positions
are sinusoidal, query head h reading K/V head h // (heads / kv_heads). The
FFN is down(gelu(up x)) for fapool_ffn = "gelu", else down(act(gate x) *
up x) with act silu or the tanh GELU. Linear weights are stored [out, in].
Prompts are seeded random tokens; generation is greedy.
"""
import argparse, json, math, os, struct

import numpy as np


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        raw = data[a:b]
        dt = info["dtype"]
        if dt == "F32":
            x = np.frombuffer(raw, dtype="<f4")
        elif dt == "F16":
            x = np.frombuffer(raw, dtype="<f2")
        elif dt == "BF16":
            x = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        elif dt == "F64":
            x = np.frombuffer(raw, dtype="<f8")
        else:
            raise SystemExit(f"{path}: tensor {name} is {dt}")
        out[name] = x.astype(np.float64).reshape(info["shape"])
    return out


def rmsnorm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def silu(x):
    return x / (1.0 + np.exp(-x))


def rope(x, theta):
    """x: [s, heads, dh] at positions 0..s-1."""
    s, _, dh = x.shape
    half = dh // 2
    inv = theta ** (-2.0 * np.arange(half) / dh)
    ang = np.arange(s)[:, None] * inv[None, :]
    c, sn = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * c - b * sn, b * c + a * sn], axis=-1)


def sinusoid(s, d):
    c = np.arange(d)
    freq = 1.0 / 10000.0 ** (2.0 * (c // 2) / d)
    ang = np.arange(s)[:, None] * freq[None, :]
    return np.where(c % 2 == 0, np.sin(ang), np.cos(ang))


class Model:
    def __init__(self, folder):
        cfg = json.load(open(os.path.join(folder, "config.json")))
        self.w = read_safetensors(os.path.join(folder, "model.safetensors"))
        self.layers = cfg["num_hidden_layers"]
        self.d = cfg["hidden_size"]
        self.heads = cfg["num_attention_heads"]
        self.kv_heads = cfg.get("num_key_value_heads", self.heads)
        self.dh = cfg.get("head_dim", self.d // self.heads)
        self.eps = cfg.get("rms_norm_eps", 1e-6)
        self.theta = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        self.sinusoidal = cfg.get("fapool_positions") == "sinusoidal"
        self.plain_gelu = cfg.get("fapool_ffn") == "gelu"
        self.act = silu if cfg.get("hidden_act", "silu") == "silu" else gelu_tanh
        self.tied = cfg.get("tie_word_embeddings", False)

    def p(self, name):
        return self.w[name]

    def logits(self, tokens):
        """Logits of the last position after the whole sequence."""
        s = len(tokens)
        x = self.p("model.embed_tokens.weight")[tokens]
        if self.sinusoidal:
            x = x + sinusoid(s, self.d)
        group = self.heads // self.kv_heads
        mask = np.triu(np.full((s, s), -np.inf), 1)
        for l in range(self.layers):
            L = lambda n: self.p(f"model.layers.{l}.{n}.weight")
            h = rmsnorm(x, L("input_layernorm"), self.eps)
            q = (h @ L("self_attn.q_proj").T).reshape(s, self.heads, self.dh)
            k = (h @ L("self_attn.k_proj").T).reshape(s, self.kv_heads, self.dh)
            v = (h @ L("self_attn.v_proj").T).reshape(s, self.kv_heads, self.dh)
            if not self.sinusoidal:
                q, k = rope(q, self.theta), rope(k, self.theta)
            o = np.empty_like(q)
            for hh in range(self.heads):
                kh = hh // group
                sc = q[:, hh] @ k[:, kh].T / math.sqrt(self.dh) + mask
                sc = np.exp(sc - sc.max(-1, keepdims=True))
                o[:, hh] = (sc / sc.sum(-1, keepdims=True)) @ v[:, kh]
            x = x + o.reshape(s, -1) @ L("self_attn.o_proj").T
            h = rmsnorm(x, L("post_attention_layernorm"), self.eps)
            up = h @ L("mlp.up_proj").T
            mid = gelu_tanh(up) if self.plain_gelu else self.act(h @ L("mlp.gate_proj").T) * up
            x = x + mid @ L("mlp.down_proj").T
        h = rmsnorm(x[-1], self.p("model.norm.weight"), self.eps)
        head = self.p("model.embed_tokens.weight") if self.tied else self.p("lm_head.weight")
        return head @ h


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--lengths", default="9,9,20,20", help="prompt lengths (consecutive equal ones form a batch)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    m = Model(a.folder)
    vocab = m.p("model.embed_tokens.weight").shape[0]
    rng = np.random.RandomState(a.seed)
    prompts = [rng.randint(0, vocab, size=int(n)).tolist() for n in a.lengths.split(",")]
    tokens, logits = [], []
    for p in prompts:
        seq, ts, ls = list(p), [], []
        for _ in range(a.steps):
            row = m.logits(seq)
            top = np.sort(row)[-2:]
            if top[1] - top[0] < 1e-6 * max(1.0, abs(top[1])):
                raise SystemExit("a near tie in the greedy choice: choose another seed")
            nxt = int(row.argmax())
            ts.append(nxt)
            ls.append([float(f"{x:.12g}") for x in row])
            seq.append(nxt)
        tokens.append(ts)
        logits.append(ls)
    json.dump({"source": f"scripts/numpy_reference.py (NumPy {np.__version__}, float64)", "prompts": prompts, "tokens": tokens, "logits": logits}, open(a.out, "w"))
    print(f"wrote {a.out}: tokens {tokens}")


if __name__ == "__main__":
    main()
