#!/usr/bin/env bash
# The GPU checks of issues #4 and #5 in one go, sized for a single ~9-minute call on a lent H100/H200, in this
# order (each a stage with a time limit, never past BUDGET seconds in all):
#   info       the device's measured bf16 matmul rate and copy bandwidth (the ceilings the figures are read against)
#   fused      the fused decode kernels against the eager step (bench/fused_check.py; FUSED_SWEEP="block_s=64;
#              num_warps=8" then times the step at five cache positions under those kernels.TUNING changes, at
#              FUSED_BATCH samples a step, which are checked too, also several a block of the products);
#              where it fails, `sanitize` runs compute-sanitizer on a small case and the later stages leave the fused
#              kernels out
#   links      what one dependent link of a decode step costs: a kernel boundary (with and without PDL) against a
#              grid-wide barrier inside one persistent kernel (bench/link_latency.py)
#   persistent a prototype of the decode step as one persistent kernel (bench/persistent_decode.py), checked
#              against the eager step and timed against the fused kernels
#   train      training throughput of the `small` (124M) preset vs transformers' GPT2LMHeadModel, MFU, step memory
#   profile    where a decode step's GPU time goes (PyTorch's kernels and the fused ones), `generate` variants
#              (greedy, and sampled by the draw kernel and by PyTorch's sampler), a token's draw under a few slice
#              sizes, and a sweep of the fused kernels' settings (SWEEP seconds)
#   generate   generation throughput and memory-bandwidth use of `small` in bf16 against transformers (GEN_SKIP
#              leaves contenders out)
#   generate-large  the same for GPT-2 medium and large (GEN_LARGE_SHAPES, default "medium,large"), the fused
#              kernels against PyTorch's eager step in CUDA graphs only: what the bandwidth use is where a step's
#              bytes, not its chain of dependent kernels, take most of its time
#   pytest     the @pytest.mark.gpu tests (compile + bf16/fp16, fused loss and decode kernels, --batch-size auto,
#              OOM message, the CLI's decode paths); PYTEST_K narrows them (pytest -k)
#   micro      the whole `tinygpt train --size micro` → generate → eval on the embedded corpus
#   train-loop `tinygpt train --size small` itself for 20 steps of 0.5M tokens: the MFU the training loop reports
#              (SMALL_ARGS="--set train.optimizer=muon" for Muon's)
#   optimizer  what an optimizer step of `small` costs, AdamW against Muon + AdamW (bench/optimizer_step.py)
#   then, if time is left: generation sampled as `tinygpt generate` does (temperature 0.8, top-k 200), the compiled
#   model with the fused loss head kept, `small` at micro-batch 32, cuDNN attention
# Run from the repository root; logs go to $OUT (default /tmp/tinygpt-gpu), a summary is printed last.
# STAGES="train generate" runs only those stages.
# Needs only what the CUDA image has (torch, transformers, typer, rich, tiktoken, pytest): src/ is used in place.
set -u
OUT=${OUT:-/tmp/tinygpt-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/tests" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
BUDGET=${BUDGET:-540}  # seconds for all stages
T0=$(date +%s)
PY=${PYTHON:-python3}

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit (never past the budget), log to $OUT/NAME.log
    local name=$1 limit=$2 left
    shift 2
    if [[ -n ${STAGES:-} && " $STAGES " != *" $name "* ]]; then return; fi
    left=$(( BUDGET - ($(date +%s) - T0) ))
    if (( left < 40 )); then echo "=== $name: skipped (${left}s of the budget left)"; return; fi
    (( limit > left )) && limit=$left
    echo "=== $name (limit ${limit}s)"
    local began=$(date +%s)
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    LAST_RC=$?
    echo "=== $name: rc=$LAST_RC in $(( $(date +%s) - began ))s"
}

stage info 40 $PY - <<'EOF'
import subprocess, time, torch
print(subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm",
                      "--format=csv,noheader"], capture_output=True, text=True).stdout.strip())
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
def timed(fn, n):
    fn(); torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n): fn()
    end.record(); torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / n
a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
s = timed(lambda: a @ b, 20)
print(f"bf16 matmul 8192^3: {2 * 8192**3 / s / 1e12:.0f} TFLOP/s (random data)")
x = torch.randn(2**30, device="cuda", dtype=torch.float32)  # 4 GiB
y = torch.empty_like(x)
s = timed(lambda: y.copy_(x), 10)
print(f"device copy: {2 * x.numel() * 4 / s / 1e12:.2f} TB/s (read + write)")
EOF

# the fused decode kernels against the eager step first: a fault in a kernel would end a later stage's process, so
# where this fails the later stages leave the fused kernels out, and compute-sanitizer looks for a bad access
LAST_RC=0
stage fused 120 $PY bench/fused_check.py --sweep "${FUSED_SWEEP:-}" --batch "${FUSED_BATCH:-1}"
NO_FUSED=()
if (( LAST_RC != 0 )); then
    NO_FUSED=(--no-fused)
    GEN_SKIP="${GEN_SKIP:+$GEN_SKIP,}fused"
    stage sanitize 120 compute-sanitizer --tool memcheck $PY bench/fused_check.py --layers 2 --steps 3 --no-timing
fi
stage links 60 $PY bench/link_latency.py --links 62
stage persistent 120 $PY bench/persistent_decode.py  # a prototype: checked against the eager step, then timed
stage train 230 $PY bench/train_throughput.py --sizes small --device cuda --contenders tinygpt,hf --rounds 5
stage profile 200 $PY bench/decode_profile.py --shape small --sweep "${SWEEP:-60}" --tokens "${PROFILE_TOKENS:-256,2048}" \
    "${NO_FUSED[@]}"
# GEN_SKIP="CD-tuned" leaves out the contender whose compile takes longest
stage generate 190 $PY bench/generate_throughput.py --device cuda --shapes small --rounds 3 --skip "${GEN_SKIP:-}"
stage generate-large 150 $PY bench/generate_throughput.py --device cuda --shapes "${GEN_LARGE_SHAPES:-medium,large}" \
    --rounds 2 --skip "compiled,no cache,no CUDA graphs,HF"
stage pytest 200 $PY -m pytest -q -p no:cacheprovider -m gpu -k "${PYTEST_K:-gpu or not gpu}" tests/test_sample.py \
    tests/test_kernels.py tests/test_generate_cli.py tests/test_evaluate.py tests/test_gpu.py tests/test_model.py
stage micro 100 bash -c '
    export TINYGPT_HOME=/tmp/tinygpt-home; rm -rf $TINYGPT_HOME; mkdir -p $TINYGPT_HOME; cd $TINYGPT_HOME
    '"$PY"' -m tinygpt_cli train --size micro --name gpu-micro '"${MICRO_ARGS:-}"' || exit 1
    '"$PY"' -c "import json; rows = [json.loads(line) for line in open(\"runs/gpu-micro/metrics.jsonl\")]; \
print([r for r in rows if r[\"kind\"] == \"train\"][-1]); print([r for r in rows if r[\"kind\"] == \"eval\"][-1])"
    '"$PY"' -m tinygpt_cli generate "ROMEO:" --run gpu-micro --max-new-tokens 64 --verbose || exit 1
    '"$PY"' -m tinygpt_cli eval gpu-micro'
stage train-loop 120 bash -c '
    export TINYGPT_HOME=/tmp/tinygpt-home-small; rm -rf $TINYGPT_HOME; mkdir -p $TINYGPT_HOME; cd $TINYGPT_HOME
    '"$PY"' -m tinygpt_cli train --size small --name gpu-small --max-steps 20 '"${SMALL_ARGS:-}"' \
        --set train.log_interval=5 --set train.eval_interval=20 --set train.eval_batches=2 || exit 1
    grep "\"train\"" runs/gpu-small/metrics.jsonl'
stage optimizer 60 $PY bench/optimizer_step.py --sizes small --device cuda --dtype bf16 --rounds 5
stage generate-sampled 90 $PY bench/generate_throughput.py --device cuda --shapes small --rounds 3 \
    --temperature 0.8 --top-k 200
stage train-fused 120 $PY bench/train_throughput.py --sizes small --device cuda --contenders tinygpt-fused --rounds 3
stage train-b32 120 $PY bench/train_throughput.py --sizes small --device cuda --contenders tinygpt --batch-size 32 \
    --rounds 3
stage train-cudnn 120 $PY bench/train_throughput.py --sizes small --device cuda --contenders tinygpt --batch-size 32 \
    --rounds 3 --sdpa cudnn

{
    echo "### summary ($(( $(date +%s) - T0 ))s)"
    for name in info train optimizer train-fused train-b32 train-cudnn; do
        [[ -f $OUT/$name.log ]] && grep -E "TFLOP|TB/s|NVIDIA|^torch|^small|^device" "$OUT/$name.log"
    done
    [[ -f $OUT/fused.log ]] && grep -vE "Warning|warn" "$OUT/fused.log" | tail -n 30
    [[ -f $OUT/links.log ]] && grep -E "link|barrier|SMs" "$OUT/links.log"
    [[ -f $OUT/persistent.log ]] && grep -E "steps,|persistent|us per token|Error" "$OUT/persistent.log"
    [[ -f $OUT/sanitize.log ]] && grep -E "ERROR|Invalid|at .* in |SUMMARY|fused check" "$OUT/sanitize.log" | head -n 20
    [[ -f $OUT/pytest.log ]] && tail -n 15 "$OUT/pytest.log"
    [[ -f $OUT/generate.log ]] && grep -E "^\||^small|bandwidth" "$OUT/generate.log"
    [[ -f $OUT/generate-sampled.log ]] && grep -E "^\||^small|bandwidth" "$OUT/generate-sampled.log"
    [[ -f $OUT/profile.log ]] && grep -vE "^\s+[0-9.]+ us" "$OUT/profile.log"
    [[ -f $OUT/micro.log ]] && tail -n 30 "$OUT/micro.log"
    [[ -f $OUT/train-loop.log ]] && tail -n 12 "$OUT/train-loop.log"
} | tee "$OUT/summary.txt"
