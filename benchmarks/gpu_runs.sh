#!/usr/bin/env bash
# The GPU runs behind BENCHMARKS.md's "GPU (H100)" section. A full run does not fit one 10-minute call
# of the lent GPU machine (torch.compile of Swin-B takes about a minute per shape), so it is split in
# parts, one call each, joined afterwards with `python benchmarks/bench.py --merge`.
#
#   bash benchmarks/gpu_runs.sh PART OUTDIR     # PART: 1 (env, parity, inference 256), 2 (training 64),
#                                               #       3 (inference 64 and 1), 4 (attention implementations)
#   python benchmarks/bench.py --merge OUTDIR/gpu-part1.json OUTDIR/gpu-part2.json OUTDIR/gpu-part3.json \
#       --out benchmarks/results/gpu-h100.json
# The parts must run on the same machine (bench.py --merge checks the GPU UUID) for the ratios to hold.
# Part 3 measures no matmul peak (--no-peak); the merge takes the same GPU's peak from the other parts.
set -u
part=$1
out=${2:-benchmarks/results/parts}
budget=${BUDGET_S:-580}  # seconds for the whole part (each bench row is written as soon as it is done)
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
left() { echo $((budget - SECONDS)); }
bench() { timeout "$(left)" python benchmarks/bench.py --timeout 300 "$@"; }

case $part in
1)
    bash benchmarks/gpu_env.sh >"$out/env.txt" 2>&1
    cat "$out/env.txt"
    timeout 240 python benchmarks/gpu_parity.py --out "$out/gpu-parity.json"
    bench --batches 256 --train-batch 0 --out "$out/gpu-part1.json" --variants \
        jax-bf16 timm-compile-bf16 timm-eager-bf16 jax-fp32 jax-fp32-highest timm-eager-fp32 timm-eager-fp32-tf32 \
        timm-compile-fp32
    ;;
2)
    bench --train-batch 64 --out "$out/gpu-part2.json" --variants \
        jax-train-bf16 timm-train-compile-bf16 timm-train-eager-bf16 jax-train-fp32 timm-train-eager-fp32 \
        timm-train-compile-fp32
    ;;
3)
    bench --no-peak --batches 64 1 --train-batch 0 --out "$out/gpu-part3.json" --variants \
        jax-bf16 timm-compile-bf16 timm-eager-bf16 jax-fp32 timm-eager-fp32 timm-compile-fp32
    ;;
4)
    timeout 200 python benchmarks/gpu_parity.py --model swin_tiny_patch4_window7_224 --batch 4 \
        --attn-impls auto xla cudnn pallas pallas_fused --out "$out/parity-attn.json"
    bench --batches 256 64 1 --train-batch 0 --out "$out/gpu-part4.json" --variants \
        jax-bf16@einsum jax-bf16@xla jax-bf16@cudnn jax-bf16@pallas jax-bf16@pallas_fused
    ;;
*)
    echo "unknown part $part" >&2
    exit 2
    ;;
esac
