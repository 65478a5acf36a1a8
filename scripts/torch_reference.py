#!/usr/bin/env python3
"""PyTorch reference for fapool's GPU targets, timed on the same GPU in the
same call: cuBLAS GEMMs on dense-4l's shapes, causal attention (FlashAttention-2
and cuDNN backends) over whole sequences and for a pool rank's query block
(the last quarter of the queries against all keys, causal from the bottom
right), decode attention (SDPA, B = 1, 4, 16, 64 sequences at 4K-64K), the
whole dense-4l prefill (eager, and with torch.compile when asked) and decode
step (CUDA graph), and, under a 2-process launch, NCCL collectives through
torch.distributed.

    python3 scripts/torch_reference.py kernels --out ref.json [--compile] [--no-model | --model-only] [--no-decode-step]
    python3 scripts/torch_reference.py llama --out ref-llama.json [--layers 4]
    mpirun -np 2 python3 scripts/torch_reference.py nccl --out ref-nccl.json
    python3 scripts/torch_reference.py moe --out ref-moe.json

The `moe` subcommand times one mixture-of-experts FFN layer of moe-16l
(d 512, 16 experts of hidden 1024, top 2, fp16) as `fapool bench moe` runs
it: router GEMM, softmax top-2 renormalised, the assignments sorted by
expert (stable), the expert counts read back to the host, the rows gathered,
one GEMM per expert up, GELU (tanh), one GEMM per expert down, and the
weighted sum back into the tokens; random weights, the same token counts.
`moe_layer_T<tokens>_ms` is the faster of the per-expert loop and, where
this PyTorch has it, torch._grouped_mm (both are written down too).

`llama`: Llama 3 8B's shapes (32 query and 8 K/V heads of 128, SwiGLU FFN
14336, RoPE theta 500000, vocab 128256) with `--layers` of its layers, in
bf16: prefill (SDPA with enable_gqa, causal) and a decode step with a KV
cache captured as a CUDA graph, at the shapes of jobs/gpu-1-llama.toml.

Medians of CUDA-event timings after warm-up, on random data. FLOP counting:
attention 4*B*H*S^2*D (halved for causal); the model 2*tokens*params(layers)
plus attention plus the LM head on the last token.
"""
import argparse, json, math, os, statistics, sys

import torch
import torch.nn.functional as F


def median_ms(fn, iters=10, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def kernels(out, model=True, compile_model=False, decode_step=True, kernels_too=True):
    dev, dt = "cuda", torch.bfloat16
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    if not kernels_too:
        model_ref(res, compile_model, decode_step)
        json.dump(res, open(out, "w"), indent=1)
        for k_, v_ in res.items():
            print(f"{k_}: {v_}")
        return
    for m, k, n in [(8192, 8192, 8192), (16384, 4096, 12288), (16384, 4096, 4096), (16384, 4096, 16384), (16384, 16384, 4096)]:
        x = torch.randn(m, k, device=dev, dtype=dt); w = torch.randn(k, n, device=dev, dtype=dt) * 0.02
        ms = median_ms(lambda: x @ w)
        res[f"gemm_{m}x{k}x{n}_tflops"] = 2 * m * k * n / ms / 1e9
    copy = torch.empty(1 << 30, device=dev, dtype=torch.uint8); dst = torch.empty_like(copy)
    ms = median_ms(lambda: dst.copy_(copy))
    res["copy_TBps"] = 2 * copy.numel() / ms / 1e9
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
    h, d = 32, 128
    backends = [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]
    for s in [4096, 16384, 65536]:
        q, k, v = (torch.randn(1, h, s, d, device=dev, dtype=dt) for _ in range(3))
        flops = 4 * h * s * s * d / 2
        for name, be in backends:
            try:
                with sdpa_kernel(be):
                    ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), iters=5)
                res[f"sdpa_{name}_causal_S{s}_tflops"] = flops / ms / 1e9
            except Exception as e:  # a backend may be unavailable
                res[f"sdpa_{name}_causal_S{s}_error"] = str(e)[:200]
        # A pool rank's block: queries s - s/4 .. s against all s keys, each
        # seeing the keys up to its own position (causal from the bottom right).
        sq = s // 4
        qb = q[:, :, s - sq:].contiguous()
        mask = causal_lower_right(sq, s)
        flops_b = 4 * h * d * (sq * (s - sq) + sq * sq / 2)
        for name, be in backends:
            try:
                with sdpa_kernel(be):
                    ms = median_ms(lambda: F.scaled_dot_product_attention(qb, k, v, attn_mask=mask), iters=5)
                res[f"sdpa_{name}_rank_block_S{s}_tflops"] = flops_b / ms / 1e9
            except Exception as e:
                res[f"sdpa_{name}_rank_block_S{s}_error"] = str(e)[:200]
        del q, k, v, qb
    torch.cuda.empty_cache()
    # Decode: one query per sequence against s cached rows, SDPA's own choice of backend.
    for b in [1, 4, 16, 64]:
        for s in [4096, 16384, 65536]:
            k, v = (torch.randn(b, h, s, d, device=dev, dtype=dt) for _ in range(2))
            qd = torch.randn(b, h, 1, d, device=dev, dtype=dt)
            ms = median_ms(lambda: F.scaled_dot_product_attention(qd, k, v), iters=20)
            res[f"decode_attn_B{b}_L{s}_TBps"] = 2 * b * s * h * d * 2 / ms / 1e9
            res[f"decode_attn_B{b}_L{s}_us"] = ms * 1e3
            del k, v, qd
            torch.cuda.empty_cache()
    if model:
        model_ref(res, compile_model, decode_step)
    json.dump(res, open(out, "w"), indent=1)
    for k_, v_ in res.items():
        print(f"{k_}: {v_}")


def model_ref(res, compile_model=False, decode_step=True):
    """dense-4l (4 layers, 4096, 32x128, FFN 16384 GELU, RMSNorm, vocab 32000) in bf16, eager
    (and compiled with torch.compile when `compile_model`)."""
    dev, dt = "cuda", torch.bfloat16
    L, D, H, Dh, Fd, V = 4, 4096, 32, 128, 16384, 32000
    g = torch.Generator(device=dev).manual_seed(0)
    mk = lambda *s: (torch.rand(*s, device=dev, generator=g, dtype=torch.float32) * 2 - 1).to(dt) * (3.0 / s[0]) ** 0.5
    layers = [dict(qkv=mk(D, 3 * D), o=mk(D, D), up=mk(D, Fd), down=mk(Fd, D), n1=torch.ones(D, device=dev, dtype=dt), n2=torch.ones(D, device=dev, dtype=dt)) for _ in range(L)]
    emb, head, nf = mk(V, D), mk(D, V), torch.ones(D, device=dev, dtype=dt)

    def rms(x, w):
        return F.rms_norm(x, (D,), w, 1e-6)

    def prefill(tokens):
        b, s = tokens.shape
        x = emb[tokens]
        for p in layers:
            h = rms(x, p["n1"])
            q, k, v = (h @ p["qkv"]).view(b, s, 3, H, Dh).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, D)
            x = x + a @ p["o"]
            x = x + F.gelu(rms(x, p["n2"]) @ p["up"], approximate="tanh") @ p["down"]
        return rms(x[:, -1], nf) @ head

    layer_params = 4 * D * D + 2 * D * Fd
    compiled = torch.compile(prefill) if compile_model else None
    for s, b in [(512, 32), (4096, 4), (16384, 4), (16384, 1), (65536, 1)]:
        tok = torch.randint(0, V, (b, s), device=dev)
        flops = 2 * b * s * L * layer_params + L * 4 * b * H * s * s * Dh / 2 + 2 * b * D * V
        for tag, fn in [("", prefill), ("_compiled", compiled)]:
            if fn is None or (tag and s < 4096):
                continue
            with torch.no_grad():
                ms = median_ms(lambda: fn(tok), iters=5, warmup=2)
            res[f"torch_prefill{tag}_S{s}_B{b}_ms"] = ms
            res[f"torch_prefill{tag}_S{s}_B{b}_tflops"] = flops / ms / 1e9
    if not decode_step:
        return
    # Decode step with a KV cache, captured as a CUDA graph.
    for b, ctx in [(64, 4096), (16, 16384), (4, 65536)]:
        kc = [torch.randn(b, H, ctx + 1, Dh, device=dev, dtype=dt) for _ in range(L)]
        vc = [torch.randn(b, H, ctx + 1, Dh, device=dev, dtype=dt) for _ in range(L)]
        tok = torch.randint(0, V, (b, 1), device=dev)

        def step():
            x = emb[tok]
            for i, p in enumerate(layers):
                h = rms(x, p["n1"])
                q, k, v = (h @ p["qkv"]).view(b, 1, 3, H, Dh).permute(2, 0, 3, 1, 4)
                kc[i][:, :, ctx:ctx + 1] = k
                vc[i][:, :, ctx:ctx + 1] = v
                a = F.scaled_dot_product_attention(q, kc[i], vc[i]).transpose(1, 2).reshape(b, 1, D)
                x = x + a @ p["o"]
                x = x + F.gelu(rms(x, p["n2"]) @ p["up"], approximate="tanh") @ p["down"]
            return (rms(x[:, -1], nf) @ head).argmax(-1)

        with torch.no_grad():
            res[f"torch_decode_B{b}_S{ctx}_ms"] = median_ms(step)
            s_ = torch.cuda.Stream()
            s_.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s_):
                step()
            torch.cuda.current_stream().wait_stream(s_)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            res[f"torch_decode_B{b}_S{ctx}_graph_ms"] = median_ms(graph.replay)
        weights = (L * layer_params + 2 * V * D) * 2
        kv = L * 2 * b * H * (ctx + 1) * Dh * 2
        res[f"decode_floor_B{b}_S{ctx}_bytes"] = weights + kv
        del kc, vc
        torch.cuda.empty_cache()


def moe(out, tokens=(128, 4096, 16384, 65536)):
    dev, dt = "cuda", torch.float16
    D, E, Fh, K = 512, 16, 1024, 2
    g = torch.Generator(device=dev).manual_seed(0)
    uni = lambda *s: (torch.rand(*s, device=dev, generator=g) * 2 - 1)
    router = (uni(D, E) * (3.0 / D) ** 0.5).to(dt)
    up = (uni(E, D, Fh) * (3.0 / D) ** 0.5).to(dt)
    down = (uni(E, Fh, D) * (3.0 / Fh) ** 0.5).to(dt)
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "dtype": "fp16", "d_model": D, "experts": E, "ffn": Fh, "top_k": K}

    def route(x):
        probs = torch.softmax((x @ router).float(), dim=-1)
        w, ids = torch.topk(probs, K, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        flat = ids.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=E).tolist()  # the host read fapool makes too
        token = order // K
        return w.flatten()[order], token, counts

    def combine(t, token, weight, outs):
        y = torch.zeros(t, D, device=dev, dtype=torch.float32)
        y.index_add_(0, token, outs.float() * weight[:, None])
        return y.to(dt)

    def loop(x):
        weight, token, counts = route(x)
        rows = x[token]
        outs = torch.empty_like(rows)
        at = 0
        for e, n in enumerate(counts):
            if n:
                h = F.gelu(rows[at:at + n] @ up[e], approximate="tanh")
                outs[at:at + n] = h @ down[e]
            at += n
        return combine(x.shape[0], token, weight, outs)

    def grouped(x):
        weight, token, counts = route(x)
        rows = x[token]
        offs = torch.tensor(counts, device=dev).cumsum(0).to(torch.int32)
        h = F.gelu(torch._grouped_mm(rows, up, offs=offs), approximate="tanh")
        return combine(x.shape[0], token, weight, torch._grouped_mm(h, down, offs=offs))

    for t in tokens:
        x = torch.randn(t, D, device=dev, dtype=dt) * 1.7
        with torch.no_grad():
            times = {"loop": median_ms(lambda: loop(x), iters=20)}
            try:
                torch.testing.assert_close(grouped(x), loop(x), rtol=2e-2, atol=2e-2)
                times["grouped_mm"] = median_ms(lambda: grouped(x), iters=20)
            except Exception as e:  # not in this PyTorch, or not for fp16
                res[f"moe_layer_T{t}_grouped_mm_error"] = str(e)[:200]
        for name, ms in times.items():
            res[f"moe_layer_T{t}_{name}_ms"] = ms
        res[f"moe_layer_T{t}_ms"] = min(times.values())
        res[f"moe_layer_T{t}_tflops"] = 2 * t * (D * E + K * 2 * D * Fh) / res[f"moe_layer_T{t}_ms"] / 1e9
    json.dump(res, open(out, "w"), indent=1)
    for k_, v_ in res.items():
        print(f"{k_}: {v_}")


def llama(out, layers=4):
    """Llama 3 8B's shapes with `layers` layers in bf16 (jobs/gpu-1-llama.toml's model)."""
    dev, dt = "cuda", torch.bfloat16
    L, D, H, KV, Dh, Fd, V, theta, eps = layers, 4096, 32, 8, 128, 14336, 128256, 500000.0, 1e-5
    g = torch.Generator(device=dev).manual_seed(0)
    mk = lambda *s: (torch.rand(*s, device=dev, generator=g, dtype=torch.float32) * 2 - 1).to(dt) * (3.0 / s[0]) ** 0.5
    ones = lambda: torch.ones(D, device=dev, dtype=dt)
    P = [dict(qkv=mk(D, (H + 2 * KV) * Dh), o=mk(H * Dh, D), gate=mk(D, Fd), up=mk(D, Fd), down=mk(Fd, D), n1=ones(), n2=ones()) for _ in range(L)]
    emb, head, nf = mk(V, D), mk(D, V), ones()
    inv = 1.0 / theta ** (torch.arange(0, Dh, 2, device=dev, dtype=torch.float32) / Dh)
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "layers": L}

    def rope(x, pos):
        # x [b, h, s, dh]; Hugging Face's half-split rotation.
        ang = pos[:, None].float() * inv[None, :]
        c, s_ = torch.cat([ang.cos()] * 2, -1).to(dt), torch.cat([ang.sin()] * 2, -1).to(dt)
        a, b = x[..., : Dh // 2], x[..., Dh // 2:]
        return x * c + torch.cat([-b, a], -1) * s_

    def layer(x, p, pos, cache=None, at=None):
        b, s, _ = x.shape
        h = F.rms_norm(x, (D,), p["n1"], eps)
        qkv = h @ p["qkv"]
        q = qkv[..., : H * Dh].view(b, s, H, Dh).transpose(1, 2)
        k = qkv[..., H * Dh:(H + KV) * Dh].view(b, s, KV, Dh).transpose(1, 2)
        v = qkv[..., (H + KV) * Dh:].view(b, s, KV, Dh).transpose(1, 2)
        q, k = rope(q, pos), rope(k, pos)
        if cache is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            kc, vc = cache
            kc[:, :, at:at + 1] = k
            vc[:, :, at:at + 1] = v
            a = F.scaled_dot_product_attention(q, kc, vc, enable_gqa=True)
        x = x + a.transpose(1, 2).reshape(b, s, H * Dh) @ p["o"]
        h = F.rms_norm(x, (D,), p["n2"], eps)
        return x + (F.silu(h @ p["gate"]) * (h @ p["up"])) @ p["down"]

    def prefill(tok):
        pos = torch.arange(tok.shape[1], device=dev)
        x = emb[tok]
        for p in P:
            x = layer(x, p, pos)
        return F.rms_norm(x[:, -1], (D,), nf, eps) @ head

    layer_params = D * (H + 2 * KV) * Dh + H * Dh * D + 3 * D * Fd
    for b, s in [(4, 4096), (4, 8064)]:
        tok = torch.randint(0, V, (b, s), device=dev)
        flops = 2 * b * s * L * layer_params + L * 4 * b * H * s * s * Dh / 2 + 2 * b * D * V
        with torch.no_grad():
            ms = median_ms(lambda: prefill(tok), iters=5, warmup=2)
        res[f"llama_prefill_B{b}_S{s}_ms"] = ms
        res[f"llama_prefill_B{b}_S{s}_tflops"] = flops / ms / 1e9
        # Decode at the prompt's end, one token per sequence, captured as a CUDA graph.
        ctx = s + 8
        caches = [(torch.randn(b, KV, ctx + 1, Dh, device=dev, dtype=dt), torch.randn(b, KV, ctx + 1, Dh, device=dev, dtype=dt)) for _ in range(L)]
        one = torch.randint(0, V, (b, 1), device=dev)
        pos = torch.tensor([ctx], device=dev)

        def step():
            x = emb[one]
            for p, c in zip(P, caches):
                x = layer(x, p, pos, c, ctx)
            return (F.rms_norm(x[:, -1], (D,), nf, eps) @ head).argmax(-1)

        with torch.no_grad():
            res[f"llama_decode_B{b}_S{ctx}_ms"] = median_ms(step, iters=20)
            s_ = torch.cuda.Stream()
            s_.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s_):
                step()
            torch.cuda.current_stream().wait_stream(s_)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            res[f"llama_decode_B{b}_S{ctx}_graph_ms"] = median_ms(graph.replay, iters=20)
        res[f"llama_decode_floor_B{b}_S{ctx}_bytes"] = (L * layer_params + 2 * V * D) * 2 + L * 2 * b * KV * (ctx + 1) * Dh * 2
        del caches
        torch.cuda.empty_cache()
    json.dump(res, open(out, "w"), indent=1)
    for k_, v_ in res.items():
        print(f"{k_}: {v_}")


def nccl(out):
    import torch.distributed as dist
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("RANK", 0)))
    world = int(os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1"); os.environ.setdefault("MASTER_PORT", "29555")
    torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group("nccl", rank=rank, world_size=world)
    res = {}
    for mib in [1, 16, 256, 1024]:
        n = mib * (1 << 20) // 2
        x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        outs = torch.empty(n * world, device="cuda", dtype=torch.bfloat16)
        for name, fn, factor, moved in [
            ("allreduce", lambda: dist.all_reduce(x), 2 * (world - 1) / world, 1),
            ("broadcast", lambda: dist.broadcast(x, 0), 1, 1),
            ("allgather", lambda: dist.all_gather_into_tensor(outs, x), (world - 1) / world, world),
        ]:
            ms = median_ms(fn, iters=20)
            t = torch.tensor([ms], device="cuda"); dist.all_reduce(t, op=dist.ReduceOp.MAX); ms = t.item()
            res[f"{name}_{mib}MiB_ms"] = ms
            res[f"{name}_{mib}MiB_busbw_GBps"] = moved * n * 2 / ms / 1e6 * factor
    if rank == 0:
        json.dump(res, open(out, "w"), indent=1)
        for k_, v_ in res.items():
            print(f"{k_}: {v_}")
    dist.destroy_process_group()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["kernels", "llama", "moe", "nccl"])
    ap.add_argument("--layers", type=int, default=4, help="llama: how many of Llama 3 8B's 32 layers")
    ap.add_argument("--out", default="torch-reference.json")
    ap.add_argument("--compile", action="store_true", help="also time the whole prefill under torch.compile")
    ap.add_argument("--no-model", action="store_true", help="kernels only: skip the whole-model prefill and decode step")
    ap.add_argument("--model-only", action="store_true", help="only the whole model (prefill, decode step)")
    ap.add_argument("--no-decode-step", action="store_true", help="skip the whole-model decode step")
    a = ap.parse_args()
    if a.what == "kernels":
        kernels(a.out, model=not a.no_model, compile_model=a.compile, decode_step=not a.no_decode_step, kernels_too=not a.model_only)
    elif a.what == "llama":
        llama(a.out, a.layers)
    else:
        {"nccl": nccl, "moe": moe}[a.what](a.out)
