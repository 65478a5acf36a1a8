#!/usr/bin/env bash
# The GPU measurements of docs/perf-notes.md, as one command on a machine
# with one or two GPUs: `scripts/gpu-run.sh [STEP...]` (default: all). Each
# step's log goes to $OUT/logs (one archive at the end) and its tail to
# $OUT/summary.txt. B names the fapool binary (default target/release/fapool).
# T names the kernel test binary that `cargo test --release --no-run` builds
# from tests/kernels.rs: cargo names it target/release/deps/kernels-<hash>
# (the hash changes with the build; default: the newest such executable).
# Build both where the Rust toolchain is and carry target/release/fapool and
# that file to the GPU machine at the same paths.
#
# Steps: check (the CUDA instantiation of every kernel check of
# tests/kernels.rs with FAPOOL_REQUIRE_GPU=1, then fapool check-gpu's
# table), kernels (fapool bench kernels and
# the PyTorch reference), comm (NCCL through fapool and torch.distributed, 2
# GPUs), verify (strategy equivalence on 2 GPUs, fp32 and bf16), model (whole
# dense-4l on one GPU), model-eager (the same with decode steps not recorded
# as CUDA graphs), decode (decode steps at the PyTorch reference's shapes,
# recorded and eager: jobs/gpu-1-decode.toml), sweep (jobs/gpu-2.toml on 2
# GPUs), sides (FA Pool's two sides' layer work apart, bench sides), trace
# (a traced one-GPU run), moe (moe-16l with EP = 1 on one GPU over
# jobs/moe.toml with 32 sequences per category and 32 output tokens,
# analysed; then one MoE layer in PyTorch and in fapool at the same shapes,
# `bench moe` giving the ratio), llama (Llama 3 8B's shapes with 4 of its
# layers on one GPU, prefill and decode, and the PyTorch reference at the
# same shapes: jobs/gpu-1-llama.toml, torch_reference.py llama), planner
# (the planner's calibration measured on the GPU with Llama 3 8B's shapes,
# the plan of jobs/gpu-1-llama.toml from it, the real run of the same job
# with the predictions stored beside the measurements, and analyze printing
# predicted against measured), planner-model (the same for dense-4l over
# jobs/gpu-1-model.toml's 4K, 16K and 64K categories).
set -uo pipefail
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
B=${B:-target/release/fapool}
T=${T:-$(find target/release/deps -maxdepth 1 -type f -executable -name 'kernels-*' -printf '%T@ %p\n' 2>/dev/null | sort -rn | head -n 1 | cut -d' ' -f2)}
OUT=${OUT:-results/gpu-run}
L=$OUT/logs
mkdir -p "$L"
step() {
    local name=$1
    shift
    echo "=== $name: $*" | tee -a "$OUT/summary.txt"
    ("$@") >"$L/$name.txt" 2>&1
    echo "exit $?" | tee -a "$OUT/summary.txt"
    tail -n "${TAILN:-40}" "$L/$name.txt" >>"$OUT/summary.txt"
}
steps=${*:-check kernels comm verify model model-eager decode sweep moe}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$L/smi.txt" 2>&1
for s in $steps; do
    case $s in
    check)
        if [ -z "$T" ]; then
            echo "=== kernel-tests: no target/release/deps/kernels-* (cargo test --release --no-run builds it)" | tee -a "$OUT/summary.txt"
        else
            TAILN=3 step kernel-tests env FAPOOL_REQUIRE_GPU=1 timeout 300 "$T" matches_the_reference_on_cuda
        fi
        TAILN=3 step check-gpu timeout 150 "$B" check-gpu --dtype all
        ;;
    kernels)
        step bench-kernels timeout 180 "$B" bench kernels --dtype bf16 --iters 10 --out "$OUT/bench-kernels.h5"
        step torch-kernels timeout 180 python3 scripts/torch_reference.py kernels --out "$L/torch-kernels.json"
        ;;
    comm)
        # Every size is checked once before it is timed (the #wrong column): allow for the host-side check.
        step bench-comm timeout 240 mpirun -np 2 "$B" bench comm --sizes-mib 1,16,256,1024 --iters 20 --out "$OUT/bench-comm.h5"
        step torch-nccl timeout 120 mpirun -np 2 python3 scripts/torch_reference.py nccl --out "$L/torch-nccl.json"
        ;;
    verify)
        step verify-fp32 timeout 240 mpirun -np 2 "$B" verify jobs/gpu-verify-fp32.toml --tolerance 1e-4
        step verify-bf16 timeout 240 mpirun -np 2 "$B" verify jobs/gpu-verify-bf16.toml --tolerance 2e-2 --teacher-forcing
        ;;
    model)
        step model timeout 200 mpirun -np 1 "$B" run jobs/gpu-1-model.toml --out "$OUT/model.h5"
        TAILN=80 step model-analyze "$B" analyze "$OUT/model.h5"
        ;;
    model-eager)
        step model-eager timeout 200 mpirun -np 1 "$B" run jobs/gpu-1-model.toml --set run.cuda_graphs=false --out "$OUT/model-eager.h5"
        TAILN=80 step model-eager-analyze "$B" analyze "$OUT/model-eager.h5"
        ;;
    decode)
        for shape in 64:4096 16:16384 4:65536; do
            n=${shape%%:*} len=${shape##*:}
            for graphs in true false; do
                tag=B$n-S$len-$([ $graphs = true ] && echo graph || echo eager)
                TAILN=12 step "decode-$tag" timeout 120 mpirun -np 1 "$B" run jobs/gpu-1-decode.toml --set workload.sequences_per_category=$n \
                    --set "workload.category.0.lengths=[$len]" --set workload.category.0.name=B$n-S$len --set run.cuda_graphs=$graphs --out "$OUT/decode-$tag.h5"
            done
        done
        ;;
    sweep)
        step sweep timeout 400 mpirun -np 2 "$B" run jobs/gpu-2.toml --out "$OUT/gpu-2.h5"
        TAILN=120 step sweep-analyze "$B" analyze "$OUT/gpu-2.h5"
        ;;
    sides)
        # FA Pool's base and pool layer work apart at the base 1 + pool 1 shapes, with the
        # 2-GPU predictions from the NCCL figures of two NVLinked H200s (LINK_GBS: point to
        # point, ALLREDUCE_GBS: all-reduce algorithm bandwidth at 256 MiB).
        TAILN=70 step bench-sides timeout 300 "$B" bench sides --seq 32768,65536 --chunks 1,4,8 --iters 5 \
            --link-gbs "${LINK_GBS:-360}" --allreduce-gbs "${ALLREDUCE_GBS:-270}" --out "$OUT/bench-sides.h5"
        ;;
    llama)
        # Llama 3 8B's shapes (GQA 32/8, RoPE, SwiGLU, vocab 128256), 4 of 32 layers, bf16.
        step llama timeout 150 mpirun -np 1 "$B" run jobs/gpu-1-llama.toml --out "$OUT/llama.h5"
        TAILN=60 step llama-analyze "$B" analyze "$OUT/llama.h5"
        step torch-llama timeout 120 python3 scripts/torch_reference.py llama --layers 4 --out "$L/torch-llama.json"
        ;;
    trace)
        # A traced one-GPU run: the compute track of every operation from CUDA events.
        step trace timeout 150 mpirun -np 1 "$B" run jobs/gpu-1.toml --set workload.sequences_per_category=2 --set run.warmup=false \
            --set 'workload.category=[{name="short",lengths=[2048]}]' --trace "$OUT/traces" --trace-batches last --out "$OUT/trace.h5"
        ;;
    moe)
        one_gpu="--set strategy.0.ep=1 --set strategy.0.tp=1 --set strategy.0.pp=1 --set strategy.0.dp=1"
        step moe-run timeout 150 mpirun -np 1 "$B" run jobs/moe.toml $one_gpu --set workload.sequences_per_category=32 --set workload.output_tokens=32 --out "$OUT/moe.h5"
        TAILN=120 step moe-analyze "$B" analyze "$OUT/moe.h5"
        step torch-moe timeout 90 python3 scripts/torch_reference.py moe --out "$L/torch-moe.json"
        reference=()
        if [ -s "$L/torch-moe.json" ]; then
            cp "$L/torch-moe.json" "$OUT/torch-moe.json"
            reference=(--reference "$OUT/torch-moe.json")
        fi
        step bench-moe timeout 60 "$B" bench moe --dtype fp16 --iters 20 "${reference[@]}" --out "$OUT/bench-moe.h5"
        ;;
    planner | planner-model)
        # About 4-5 minutes of GPU time per step: on an H200 the calibration's
        # GEMM grid took 78 s and prefill attention 29 s more, and the decode,
        # bandwidth and sequence-overhead tables follow (about 3-4 minutes in
        # all, plus the NVRTC compile); the plan runs on the host in seconds,
        # the run under a minute, analyze a second.
        if [ "$s" = planner ]; then
            tag=llama job=jobs/gpu-1-llama.toml only=()
        else
            tag=model job=jobs/gpu-1-model.toml only=(--set 'workload.category=[{name="S4096",lengths=[4096]},{name="S16384",lengths=[16384]},{name="S65536",lengths=[65536]}]')
        fi
        cal="$OUT/cal-$tag.h5"
        TAILN=20 step "calibrate-$tag" timeout 300 mpirun -np 1 "$B" calibrate --backend cuda --dtype bf16 --job "$job" --out "$cal"
        TAILN=30 step "plan-$tag" timeout 60 "$B" plan "$job" "${only[@]}" --calibration "$cal" --per-gpu
        step "planned-run-$tag" timeout 150 mpirun -np 1 "$B" run "$job" "${only[@]}" --calibration "$cal" --out "$OUT/planned-$tag.h5"
        TAILN=80 step "planned-analyze-$tag" "$B" analyze "$OUT/planned-$tag.h5"
        if [ "$s" = planner-model ]; then
            # One sequence per batch, then the decode job's three shapes.
            step planned-run-model-b1 timeout 150 mpirun -np 1 "$B" run "$job" "${only[@]}" --set workload.batch_size=1 --calibration "$cal" --out "$OUT/planned-model-b1.h5"
            TAILN=80 step planned-analyze-model-b1 "$B" analyze "$OUT/planned-model-b1.h5"
            for shape in 64:4096 16:16384 4:65536; do
                n=${shape%%:*} len=${shape##*:}
                step "planned-decode-B$n-S$len" timeout 120 mpirun -np 1 "$B" run jobs/gpu-1-decode.toml --set workload.sequences_per_category=$n \
                    --set "workload.category.0.lengths=[$len]" --set workload.category.0.name=B$n-S$len --calibration "$cal" --out "$OUT/planned-decode-B$n-S$len.h5"
                TAILN=40 step "planned-decode-analyze-B$n-S$len" "$B" analyze "$OUT/planned-decode-B$n-S$len.h5"
            done
        fi
        ;;
    *) echo "unknown step $s" >&2 ;;
    esac
done
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$L"
