#!/usr/bin/env bash
# The GPU suite: every device path of the project, run unattended, with a PASS/FAIL line per check.
#
#   scripts/gpu_check.sh                          # on a CUDA machine: the full suite (about 20 minutes on one H100)
#   scripts/gpu_check.sh --wheels wheels/         # first install the package and its dependencies offline
#   scripts/gpu_check.sh --device cpu --steps 4 --models "rnn transformer" -- trainer.max_tokens=512
#                                                 # the same checks as a CPU smoke test (fp32, eager, Gloo)
#
# Checks, on --device cuda (the default):
#   1. pytest -m cuda (the GPU tests: pinned batches, recurrent models under autocast, ...);
#   2. every model family x {bf16, fp16, fp32} x trainer.compile {false, true}: --steps updates, a finite loss,
#      the checkpoint is written, and seq2seq-translate runs from it on the GPU in that precision;
#   3. torchrun with NCCL: 1 process, and 2 when the machine has 2 GPUs (replica weights compared bit for bit);
#   4. the base Transformer (d_model 512, 8 heads, 6+6 layers, ff 2048) in bf16: scripts/benchmark.py, tokens/s
#      and MFU against the measured bf16 matmul peak (target: >= 40 % on an H100);
#   5. decoding speed and BLEU over the 1,500 test sentences, greedy and beam 5, fp32 against bf16 (target:
#      >= 1,000 sentences/s greedy), with a Transformer trained for --speed-steps updates.
# On --device cpu the same checks run in fp32 only, eagerly, with Gloo and 2 processes, and the benchmark uses the
# last --models entry at its configured size: a smoke test of the suite itself (the test suite runs it).
# Everything after `--` is passed to every training, benchmark and evaluation run as Hydra overrides.
# Output: OUT/summary.txt (the PASS/FAIL lines and figures), OUT/logs/*.log, OUT/runs/*; exit 1 if a check failed.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda STEPS=50 SPEED_STEPS=3000 OUT=gpu-check WHEELS="" MODELS="rnn bahdanau transformer"
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --steps) STEPS="$2"; shift 2 ;;
        --speed-steps) SPEED_STEPS="$2"; shift 2 ;;
        --models) MODELS="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --wheels) WHEELS="$2"; shift 2 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) echo "gpu_check.sh: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT/logs" "$OUT/runs"
OUT="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this tree's seq2seq, installed or not
if [ -n "$WHEELS" ]; then
    "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" "$WHEELS"/*.whl \
        || { echo "gpu_check.sh: installing the wheels in $WHEELS failed" >&2; exit 2; }
fi
if ! "$PYTHON" -c "import hydra, datasets, sentencepiece, sacrebleu, tensorboard, matplotlib, pytest" 2>/dev/null; then
    echo "gpu_check.sh: dependencies are missing; build wheels on a machine with internet access (README, 'GPU suite')" >&2
    echo "and run this script with --wheels DIR." >&2
    exit 2
fi
if [ "$DEVICE" = cuda ] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check.sh: torch sees no CUDA GPU; use --device cpu for the smoke test" >&2
    exit 2
fi

report() {  # report NAME STATUS DETAIL
    printf '%-4s %-44s %s\n' "$2" "$1" "$3" | tee -a "$SUMMARY"
    [ "$2" = PASS ] || FAILED=1
}

run_logged() {  # run_logged NAME COMMAND...: output to logs/NAME.log, returns the command's status
    local name="$1"; shift
    "$@" > "$OUT/logs/$name.log" 2>&1
}

result_field() {  # result_field RUN_DIR KEY
    "$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1] + '/results.json'))[sys.argv[2]])" "$1" "$2"
}

if [ "$DEVICE" = cuda ]; then
    PRECISIONS="bf16 fp16 fp32" COMPILES="false true"
    NPROCS="1"; [ "$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ] && NPROCS="1 2"
else
    PRECISIONS="fp32" COMPILES="false" NPROCS="2"
fi
TRAIN=(-m seq2seq.train "trainer.device=$DEVICE" "trainer.max_steps=$STEPS" "trainer.eval_every=$STEPS"
       "trainer.time_limit_minutes=null")

# 1. the GPU tests
if [ "$DEVICE" = cuda ]; then
    if run_logged pytest "$PYTHON" -m pytest -q -m cuda; then report "pytest -m cuda" PASS "$(tail -1 "$OUT/logs/pytest.log")"
    else report "pytest -m cuda" FAIL "see logs/pytest.log"; fi
fi

# 2. families x precisions x compile: train, checkpoint, translate
for model in $MODELS; do
    for precision in $PRECISIONS; do
        for compile in $COMPILES; do
            name="$model-$precision-compile_$compile" run="$OUT/runs/$name"
            if ! run_logged "$name" "$PYTHON" "${TRAIN[@]}" "model=$model" "trainer.precision=$precision" \
                    "trainer.compile=$compile" "hydra.run.dir=$run" "${EXTRA[@]}"; then
                report "$name" FAIL "training failed, see logs/$name.log"; continue
            fi
            loss="$(result_field "$run" valid_loss)" nonfinite="$(result_field "$run" nonfinite_steps)"
            translation="$("$PYTHON" -m seq2seq.translate --checkpoint "$run/checkpoints/best.pt" --device "$DEVICE" \
                           --precision "$precision" 我是一个学生。 2>> "$OUT/logs/$name.log")"
            if "$PYTHON" -c "import math, sys; sys.exit(not math.isfinite(float(sys.argv[1])))" "$loss" \
                    && [ "$nonfinite" = 0 ] && [ -n "$translation" ]; then
                report "$name" PASS "valid loss $loss; 我是一个学生。 -> $translation"
            else
                report "$name" FAIL "valid loss $loss, $nonfinite non-finite steps, translation '$translation'"
            fi
        done
    done
done

# 3. torchrun (NCCL between GPUs, Gloo on the CPU)
for nproc in $NPROCS; do
    name="torchrun-nproc_$nproc" run="$OUT/runs/$name"
    if run_logged "$name" "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$nproc" "${TRAIN[@]}" \
            "model=${MODELS##* }" "hydra.run.dir=$run" "${EXTRA[@]}"; then
        replicas="$(grep -o 'replica weights identical on [0-9]* ranks' "$OUT/logs/$name.log" || echo "single rank")"
        report "$name" PASS "$replicas, world_size $(result_field "$run" world_size)"
    else
        report "$name" FAIL "see logs/$name.log"
    fi
done

# 4. the base-size Transformer benchmark (bf16 on a GPU)
if [ "$DEVICE" = cuda ]; then
    BENCH=(model=transformer model.d_model=512 model.num_heads=8 model.encoder_layers=6 model.decoder_layers=6
           model.ff_dim=2048 trainer.precision=bf16 trainer.max_tokens=16384 trainer.compile=true)
else
    BENCH=(--steps 2 --warmup 1 --phase-steps 1 "model=${MODELS##* }")
fi
if run_logged benchmark "$PYTHON" scripts/benchmark.py "trainer.device=$DEVICE" "${BENCH[@]}" "${EXTRA[@]}" \
        --json "$OUT/benchmark.json"; then
    report "benchmark" PASS "$(grep -E '^(target tokens/s|MFU)' "$OUT/logs/benchmark.log" | tr -s ' ' | paste -sd';')"
else
    report "benchmark" FAIL "see logs/benchmark.log"
fi

# 5. decoding speed and BLEU over the test split: greedy and beam 5, fp32 and (where native) bf16
speed_model="${MODELS##* }" speed_run="$OUT/runs/speed-$speed_model"
speed_steps=$([ "$DEVICE" = cuda ] && echo "$SPEED_STEPS" || echo "$STEPS")
if run_logged speed-train "$PYTHON" "${TRAIN[@]}" "model=$speed_model" "trainer.max_steps=$speed_steps" \
        "trainer.eval_every=$speed_steps" "hydra.run.dir=$speed_run" "${EXTRA[@]}"; then
    for precision in fp32 $([ "$DEVICE" = cuda ] && echo bf16); do
        for beam in 1 5; do
            name="decode-$precision-beam_$beam"
            if run_logged "$name" "$PYTHON" -m seq2seq.evaluate --checkpoint "$speed_run/checkpoints/best.pt" \
                    --device "$DEVICE" --precision "$precision" --beam-size "$beam" --verbose --json "$OUT/$name.json"; then
                report "$name" PASS "$(grep -m1 -oE '^BLEU +[0-9.]+' "$OUT/logs/$name.log" | tr -s ' '), $(grep -oE '[0-9.]+ sentences/s' "$OUT/logs/$name.log" | tail -1)"
            else
                report "$name" FAIL "see logs/$name.log"
            fi
        done
    done
else
    report "speed-train" FAIL "see logs/speed-train.log"
fi

echo "summary: $SUMMARY"
exit $FAILED
