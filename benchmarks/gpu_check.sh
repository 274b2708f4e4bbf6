#!/usr/bin/env bash
# The prepared GPU check: one call of at most 8 minutes on one H100 / H200 (machine start aside), shared by
# the training-speed and the inference issues. Every result is written as soon as it is finished, so a
# call that runs out of time keeps what it measured.
#
#   bash benchmarks/gpu_check.sh OUTDIR          # e.g. through the device tool: PYTHONPATH=. bash ...
#
# In order of priority (each step gets what is left of BUDGET_S, default 470 s):
#   1. env.txt: date, GPU, driver, versions;
#   2. training step, bf16, batch 64: swin-jax TrainStep (traced: device busy fraction) against timm +
#      torch.compile, then timm + torch.compile with fused attention (TIMM_FUSED_ATTN=2);
#   3. inference, bf16, batch 256: swin-jax (traced) against the two timm torch.compile rows, with the
#      bf16 matmul peak measured in the same run; then swin-jax with scanned blocks (does it cut the 39 s compile?);
#   4. parity of every attention implementation on the GPU (fp32 at 'highest' and bf16, a small Swin), then
#      bf16 inference at batch 256 with each kernel implementation (pallas_fused, pallas, cudnn, xla): the
#      inference issue's target row;
#   5. SwinV2-T and SwinV2-CR-T against timm float64 (fp32 at 'highest' and at jax's default precision);
#   6. the bf16 training step with 8 steps per call (TrainStep.run, finetune --steps-per-call 8): is the
#      one-step call host-bound? (one dispatch per 8 steps; times per step); then the implementations of step 4
#      at batch 64 and 1;
#   7. the same bf16 training step with the per-block backward cut forced on (SWIN_JAX_BACKWARD_CUT=always:
#      does the fusion problem it fixes on the CPU exist on the GPU?);
#   8. the bf16 training step with each stage's repeated blocks as one scan (set_scan_blocks): its compile time;
#   9. host time per training-step call (benchmarks/host_time.py), then fp32 training like-for-like;
#  10. XLA flag variants of bf16 inference at batch 256, one try each: no command buffers, cuDNN layer norm,
#      autotune level 0.
#  11. the bf16 training step with cuDNN's attention and with the Pallas kernels (attn_impl cudnn: cuDNN's own
#      backward, the least memory traffic of all in the compile-time estimate, BENCHMARKS.md "Compiled without the
#      device"; pallas, pallas_fused: forward in the kernel, the backward recomputing the attention in plain JAX).
#  12. each block's attention alone, per implementation and per Triton launch of the Pallas kernels (warps, heads per
#      program: benchmarks/kernel_tune.py; the most frequent blocks first): which launch TRITON_TUNING should name.
#      If the budget ran out before it, it is the next call: PYTHONPATH=. python benchmarks/kernel_tune.py --out F.
# A dry run on the CPU (small model and batches, to check the script, not to measure):
#   MODEL=swin_tiny_patch4_window7_224 TRAIN_BATCH=2 INFER_BATCH=2 bash benchmarks/gpu_check.sh /tmp/dry
# Afterwards, here: python benchmarks/bench.py --merge OUTDIR/train-bf16.json OUTDIR/infer-bf16.json \
#   --out benchmarks/results/gpu-<card>.json   (ratios only between rows of the same GPU UUID).
set -u
out=${1:-benchmarks/results/gpu-check}
budget=${BUDGET_S:-470}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
left() { echo $((budget - SECONDS)); }
model=${MODEL:-swin_base_patch4_window7_224}
bench() { [ "$(left)" -gt 30 ] && timeout "$(left)" python benchmarks/bench.py --model "$model" --timeout 240 "$@"; }

{
    echo "command: bash benchmarks/gpu_check.sh $out"
    bash benchmarks/gpu_env.sh
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

bench --no-peak --profile --train-batch ${TRAIN_BATCH:-64} --out "$out/train-bf16.json" --variants \
    jax-train-bf16 timm-train-compile-bf16 timm-train-compile-bf16-fused
bench --profile --batches ${INFER_BATCH:-256} --train-batch 0 --out "$out/infer-bf16.json" --variants \
    jax-bf16 timm-compile-bf16-fused timm-compile-bf16 jax-bf16-scan
[ "$(left)" -gt 60 ] && timeout "$(left)" python benchmarks/gpu_parity.py --model swin_tiny_patch4_window7_224 \
    --batch 4 --attn-impls auto xla cudnn pallas pallas_fused --out "$out/parity-attn.json"
attn_variants="jax-bf16@pallas_fused jax-bf16@pallas jax-bf16@cudnn jax-bf16@xla"
bench --no-peak --batches ${INFER_BATCH:-256} --train-batch 0 --out "$out/infer-attn.json" --variants $attn_variants
for pair in v2:swinv2_tiny_window8_256 v2cr:swinv2_cr_tiny_ns_224; do
    [ "$(left)" -gt 60 ] && timeout "$(left)" python benchmarks/gpu_parity.py --model "${pair#*:}" --batch 4 \
        --out "$out/parity-${pair%%:*}.json"
done
bench --no-peak --profile --train-batch ${TRAIN_BATCH:-64} --out "$out/train-bf16-k8.json" --variants jax-train-bf16-k8
bench --no-peak --batches ${SMALL_BATCHES:-64 1} --train-batch 0 --out "$out/infer-attn-small.json" \
    --variants $attn_variants
bench --no-peak --profile --train-batch ${TRAIN_BATCH:-64} --out "$out/train-bf16-cut.json" --variants \
    jax-train-bf16-cut
bench --no-peak --train-batch ${TRAIN_BATCH:-64} --out "$out/scan-bf16.json" --variants jax-train-bf16-scan
[ "$(left)" -gt 60 ] && timeout "$(left)" python benchmarks/host_time.py --model "$model" --out "$out/host_time.json"
bench --no-peak --profile --train-batch ${TRAIN_BATCH:-64} --out "$out/train-fp32.json" --variants \
    jax-train-fp32 timm-train-compile-fp32
for flags in --xla_gpu_enable_command_buffer= --xla_gpu_enable_cudnn_layer_norm=true --xla_gpu_autotune_level=0; do
    name=${flags#--xla_gpu_}; name=${name%%=*}
    XLA_FLAGS="$flags" bench --no-peak --batches ${INFER_BATCH:-256} --train-batch 0 \
        --out "$out/infer-flag-$name.json" --variants jax-bf16
done
bench --no-peak --train-batch ${TRAIN_BATCH:-64} --out "$out/train-attn.json" --variants \
    jax-train-bf16@cudnn jax-train-bf16@pallas_fused jax-train-bf16@pallas
[ "$(left)" -gt 60 ] && timeout "$(left)" python benchmarks/kernel_tune.py --model "$model" \
    --batch ${INFER_BATCH:-256} --repeats ${TUNE_REPEATS:-10} --out "$out/tune.json"
echo "done after $SECONDS s"
