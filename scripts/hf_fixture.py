#!/usr/bin/env python3
"""Makes tests/fixtures/hf-llama-tiny: a tiny random Llama (2 layers, hidden
64, 4 heads, 2 K/V heads, FFN 256, vocab 512, RoPE, SwiGLU, untied
embeddings) saved by Hugging Face transformers' save_pretrained as
safetensors (bf16 weights), and reference.json: transformers' own greedy
tokens and every step's logits for a few prompts, computed in float64 from
those bf16 weights, in the format of `fapool verify --reference`.

    python3 scripts/hf_fixture.py [--out tests/fixtures/hf-llama-tiny]

Needs torch and transformers (not CI: the fixture is committed). Prompts
come in two lengths, so one batch runs below and one above a small FA Pool
threshold. Every step's winning logit leads the runner-up by a margin, so
identical greedy tokens are a fair demand of an f32 implementation.
"""
import argparse, json, os

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main(out):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, hidden_act="silu", attention_bias=False, mlp_bias=False, initializer_range=0.1,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Norm scales other than one, so a missed scale cannot pass.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model = model.to(torch.bfloat16)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    # Compute in float64 from exactly the saved bf16 values, reloaded (a
    # dtype cast of the model in memory would also round RoPE's inverse
    # frequencies, a buffer, to bf16).
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in (9, 9, 20, 20)]
    steps = 4
    tokens, logits = [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            seq_tokens, seq_logits = [], []
            for _ in range(steps):
                row = model(input_ids=ids).logits[0, -1]
                top = torch.topk(row, 2).values
                assert (top[0] - top[1]).item() > 1e-3, "a near tie: choose another seed"
                nxt = int(row.argmax())
                seq_tokens.append(nxt)
                seq_logits.append([float(f"{x:.9g}") for x in row.tolist()])
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            tokens.append(seq_tokens)
            logits.append(seq_logits)
    import transformers
    ref = {
        "source": f"transformers {transformers.__version__} LlamaForCausalLM, torch {torch.__version__}, float64 from bf16 weights",
        "prompts": prompts,
        "tokens": tokens,
        "logits": logits,
    }
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(ref, f, separators=(",", ":"))
    print(f"wrote {out}: tokens {tokens}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/hf-llama-tiny")
    main(ap.parse_args().out)
