#!/usr/bin/env bash
# The prepared GPU check, shared by the training-speed and the inference issues. Every result is written as soon as
# it is finished, so a call that runs out of time keeps what it measured.
#
#   bash benchmarks/gpu_check.sh OUTDIR              # all steps that fit in BUDGET_S
#   FROM=4 bash benchmarks/gpu_check.sh OUTDIR       # a second call: steps 4 onwards (same OUTDIR)
#   ARCHIVE=F.tgz bash benchmarks/gpu_check.sh DIR   # also pack DIR into F.tgz at the end
# Through the device tool, which brings back at most 8 files from $OUT (this writes more), as one archive:
#   run(command="PYTHONPATH=. BUDGET_S=450 ARCHIVE=$OUT/gpu1.tgz bash benchmarks/gpu_check.sh /tmp/gpu",
#       timeout_s=500); at once, the first step not finished as N: FROM=N BUDGET_S=<what is left> ARCHIVE=$OUT/gpu2.tgz
#
# One call gets BUDGET_S seconds (default 470; a device call may last 10 minutes, and a session has 15 minutes of
# device time, machine start included). On an H100, a variant costs about its compile plus ~15 s: swin-jax
# inference ~40 s, training ~80 s; timm + torch.compile inference ~65 s, training ~115 s. So one call measures
# steps 1-3 and part of 4, and the second call (FROM=N, N the first step the first call did not finish) the next
# ~3 minutes: the machine is given back 30 s after a call ends, so it has to follow at once.
# In order of priority:
#   1. env.txt (env-fromN.txt on a later call): date, GPU, driver, versions;
#   2. the inference issue's target row: bf16 inference at batch 256, swin-jax with the fused kernel, cuDNN's
#      attention and the einsum path (traced: device busy fraction), against timm + torch.compile with and without
#      its fused attention (TIMM_FUSED_ATTN=2), with the bf16 matmul peak measured in the same run;
#   3. parity of every attention implementation on the GPU (fp32 at 'highest' and bf16, a small Swin);
#   4. the training issue's target row: the bf16 training step at batch 64, swin-jax TrainStep with cuDNN's attention
#      (its own backward: the least memory traffic in the compile-time estimate, BENCHMARKS.md "Compiled without the
#      device") and with the einsum path (traced), against timm + torch.compile with and without fused attention;
#   5. each block's attention alone, per implementation and per Triton launch of the Pallas kernels
#      (benchmarks/kernel_tune.py; the most frequent blocks first): which launch TRITON_TUNING should name;
#   6. bf16 inference at batch 256 with the other implementations (pallas, xla) and with scanned blocks (does it cut
#      the 39 s compile?);
#   7. SwinV2-T and SwinV2-CR-T against timm float64 (fp32 at 'highest' and at jax's default precision);
#   8. the bf16 training step with 8 steps per call (TrainStep.run, finetune --steps-per-call 8): is the one-step
#      call host-bound? (one dispatch per 8 steps; times per step);
#   9. bf16 inference at batch 64 and 1 with each kernel implementation;
#  10. the bf16 training step with the per-block backward cut forced on (SWIN_JAX_BACKWARD_CUT=always: does the
#      fusion problem it fixes on the CPU exist on the GPU?);
#  11. the bf16 training step with each stage's repeated blocks as one scan (set_scan_blocks): its compile time;
#  12. host time per training-step call (benchmarks/host_time.py), then fp32 training like-for-like;
#  13. XLA flag variants of bf16 inference at batch 256, one try each: no command buffers, cuDNN layer norm,
#      autotune level 0 (how much of the compile is autotuning);
#  14. the bf16 training step with the Pallas kernels (forward in the kernel, the backward recomputing the attention
#      in plain JAX).
# A dry run on the CPU (small model and batches, to check the script, not to measure):
#   MODEL=swin_tiny_patch4_window7_224 TRAIN_BATCH=2 INFER_BATCH=2 bash benchmarks/gpu_check.sh /tmp/dry
# Afterwards, here: python benchmarks/bench.py --merge OUTDIR/train-bf16.json OUTDIR/infer-bf16.json \
#   --out benchmarks/results/gpu-<card>.json   (ratios only between rows of the same GPU UUID).
set -u
out=${1:-benchmarks/results/gpu-check}
budget=${BUDGET_S:-470}
from=${FROM:-1}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
left() { echo $((budget - SECONDS)); }
step() { [ "$1" -ge "$from" ] && [ "$(left)" -gt "${2:-30}" ] && echo "== step $1 after $SECONDS s" >&2; }
model=${MODEL:-swin_base_patch4_window7_224}
bench() { [ "$(left)" -gt 30 ] && timeout "$(left)" python benchmarks/bench.py --model "$model" --timeout 240 "$@"; }
infer=${INFER_BATCH:-256}
train=${TRAIN_BATCH:-64}

env_file="$out/env.txt"
[ "$from" -gt 1 ] && env_file="$out/env-from$from.txt"
{
    echo "command: FROM=$from BUDGET_S=$budget bash benchmarks/gpu_check.sh $out"
    bash benchmarks/gpu_env.sh
} >"$env_file" 2>&1
cat "$env_file"

step 2 && bench --profile --batches $infer --train-batch 0 --out "$out/infer-bf16.json" --variants \
    jax-bf16@pallas_fused timm-compile-bf16 jax-bf16@cudnn timm-compile-bf16-fused jax-bf16
step 3 60 && timeout "$(left)" python benchmarks/gpu_parity.py --model swin_tiny_patch4_window7_224 \
    --batch 4 --attn-impls auto xla cudnn pallas pallas_fused --out "$out/parity-attn.json"
step 4 && bench --no-peak --profile --train-batch $train --out "$out/train-bf16.json" --variants \
    jax-train-bf16@cudnn timm-train-compile-bf16 jax-train-bf16 timm-train-compile-bf16-fused
step 5 60 && timeout "$(left)" python benchmarks/kernel_tune.py --model "$model" --batch $infer \
    --repeats ${TUNE_REPEATS:-10} --out "$out/tune.json"
step 6 && bench --no-peak --batches $infer --train-batch 0 --out "$out/infer-attn.json" --variants \
    jax-bf16@pallas jax-bf16@xla jax-bf16-scan
for pair in v2:swinv2_tiny_window8_256 v2cr:swinv2_cr_tiny_ns_224; do
    step 7 60 && timeout "$(left)" python benchmarks/gpu_parity.py --model "${pair#*:}" --batch 4 \
        --out "$out/parity-${pair%%:*}.json"
done
step 8 && bench --no-peak --profile --train-batch $train --out "$out/train-bf16-k8.json" --variants jax-train-bf16-k8
step 9 && bench --no-peak --batches ${SMALL_BATCHES:-64 1} --train-batch 0 --out "$out/infer-attn-small.json" \
    --variants jax-bf16@pallas_fused jax-bf16@cudnn jax-bf16 jax-bf16@pallas jax-bf16@xla
step 10 && bench --no-peak --profile --train-batch $train --out "$out/train-bf16-cut.json" --variants \
    jax-train-bf16-cut
step 11 && bench --no-peak --train-batch $train --out "$out/scan-bf16.json" --variants jax-train-bf16-scan
step 12 60 && timeout "$(left)" python benchmarks/host_time.py --model "$model" --out "$out/host_time.json"
step 12 && bench --no-peak --profile --train-batch $train --out "$out/train-fp32.json" --variants \
    jax-train-fp32 timm-train-compile-fp32
for flags in --xla_gpu_enable_command_buffer= --xla_gpu_enable_cudnn_layer_norm=true --xla_gpu_autotune_level=0; do
    name=${flags#--xla_gpu_}; name=${name%%=*}
    step 13 && XLA_FLAGS="$flags" bench --no-peak --batches $infer --train-batch 0 \
        --out "$out/infer-flag-$name.json" --variants jax-bf16
done
step 14 && bench --no-peak --train-batch $train --out "$out/train-attn.json" --variants \
    jax-train-bf16@pallas_fused jax-train-bf16@pallas
echo "done after $SECONDS s"
if [ -n "${ARCHIVE:-}" ]; then
    tar czf "$ARCHIVE" -C "$(dirname "$out")" "$(basename "$out")" && echo "packed $out into $ARCHIVE"
fi
