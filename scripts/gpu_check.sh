#!/usr/bin/env bash
# The GPU suite: the device paths of the project, most important first, inside a time budget. Each check writes its
# PASS / FAIL / SKIP / CUT line to OUT/summary.txt as soon as it ends, so a run cut off by its slot still reports.
#
#   scripts/gpu_check.sh --budget-minutes 12                # on a CUDA machine (a 15-minute slot, start-up included)
#   scripts/gpu_check.sh --wheels wheels --budget-minutes 12
#                                                           # first install the missing packages offline (README)
#   scripts/gpu_check.sh --device cpu --steps 4 --models "tiny_rnn tiny_transformer" -- trainer.max_tokens=512
#                                                           # the same checks as a CPU smoke test (fp32, eager, Gloo)
#
# Checks, in this order, on --device cuda (the default):
#   1. each family of --models in bf16: --steps updates, a finite loss and no skipped step, the checkpoint, and
#      seq2seq.translate from it on the GPU in bf16 (results.json's target tokens/s is the figure);
#   2. the same in fp16, then in fp32;
#   3. trainer.compile=true, bf16, each family;
#   4. torchrun with NCCL and 1 process (and 2 when the machine has 2 GPUs): the run reaches its end
#      (averaging, test, results.json), replica weights compared bit for bit;
#   5. pytest -m cuda (the GPU tests);
#   6. the base Transformer (d_model 512, 8 heads, 6+6 layers, ff 2048) in bf16 with torch.compile:
#      scripts/benchmark.py, target tokens/s and MFU against the measured bf16 matrix-multiply peak;
#   7. a Transformer trained for --speed-minutes, then the test split decoded greedy and with beam 5 in bf16
#      (sentences/s) and in fp32: the BLEU of bf16 against fp32's.
# A check starts only when the budget left covers its estimate (else SKIP, with the estimate), and runs under
# `timeout` with the budget left (CUT when it runs past it). Lines starting with "figure" hold the numbers the
# README's GPU table takes. On --device cpu the checks run in fp32 only, eagerly, with Gloo and 2 processes, the
# benchmark uses the last --models entry at its configured size and the speed model trains --steps updates: a
# smoke test of the suite itself (the test suite runs it).
# Everything after `--` is passed to every training, benchmark and evaluation run as Hydra overrides.
# Output: OUT/summary.txt, OUT/logs/*.log, OUT/runs/*. Exit status: 1 if a check failed, else 3 if one was skipped
# or cut, else 0.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda STEPS=50 SPEED_MINUTES=2 BUDGET_MINUTES=0 OUT=gpu-check WHEELS="" MODELS="rnn bahdanau transformer"
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --steps) STEPS="$2"; shift 2 ;;
        --speed-minutes) SPEED_MINUTES="$2"; shift 2 ;;
        --budget-minutes) BUDGET_MINUTES="$2"; shift 2 ;;
        --models) MODELS="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --wheels) WHEELS="$2"; shift 2 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) echo "gpu_check.sh: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
PYTHON="${PYTHON:-python}"
STARTED=$(date +%s)
if [ "$BUDGET_MINUTES" = 0 ]; then DEADLINE=$((STARTED + 10 ** 9))
else DEADLINE=$(awk -v start="$STARTED" -v minutes="$BUDGET_MINUTES" 'BEGIN { printf "%d", start + minutes * 60 }'); fi
mkdir -p "$OUT/logs" "$OUT/runs"
OUT="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0 INCOMPLETE=0

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1  # this tree's seq2seq, installed or not
if [ -n "$WHEELS" ]; then  # beside the machine's own packages, not over them (scripts/gpu_wheels.sh fetches them)
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --target "$OUT/site" "$WHEELS"/*.whl \
        || { echo "gpu_check.sh: installing the wheels in $WHEELS failed" >&2; exit 2; }
    export PYTHONPATH="$PYTHONPATH:$OUT/site"
fi
if ! "$PYTHON" -c "import hydra, datasets, sentencepiece, sacrebleu, tensorboard, matplotlib, pytest" 2>/dev/null; then
    echo "gpu_check.sh: dependencies are missing; fetch them as wheels where there is internet access (README," >&2
    echo "'GPU suite') and run this script with --wheels DIR." >&2
    exit 2
fi
if [ "$DEVICE" = cuda ] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check.sh: torch sees no CUDA GPU; use --device cpu for the smoke test" >&2
    exit 2
fi

report() {  # report NAME STATUS DETAIL: one line of the summary, written at once
    printf '%-4s %-36s %s\n' "$2" "$1" "$3" | tee -a "$SUMMARY"
    case "$2" in FAIL) FAILED=1 ;; SKIP|CUT) INCOMPLETE=1 ;; esac
}

figure() {  # figure KEY VALUE: a number for the README's GPU table
    echo "figure $1 $2" | tee -a "$SUMMARY"
}

left() { echo $((DEADLINE - $(date +%s))); }

affordable() {  # affordable NAME SECONDS: whether the budget left covers a check estimated at SECONDS
    local remaining; remaining=$(left)
    [ "$remaining" -ge "$2" ] && return 0
    report "$1" SKIP "needs about $2 s, $remaining s of the budget left"
    return 1
}

run_logged() {  # run_logged NAME COMMAND...: output to logs/NAME.log, at most the budget left; 124 when cut
    local name="$1"; shift
    timeout --kill-after=20 "$(left)" "$@" > "$OUT/logs/$name.log" 2>&1
}

failed() {  # failed NAME STATUS WHAT: the FAIL or CUT line of a command that returned STATUS
    if [ "$2" = 124 ] || [ "$2" = 137 ]; then report "$1" CUT "$3 ran past the budget, see logs/$1.log"
    else report "$1" FAIL "$3 failed (status $2), see logs/$1.log"; fi
}

field() {  # field JSON_FILE KEY[.KEY...]
    "$PYTHON" -c "
import json, sys
value = json.load(open(sys.argv[1]))
for key in sys.argv[2].split('.'):
    value = value[key]
print(value)" "$1" "$2"
}

if [ "$DEVICE" = cuda ]; then
    PRECISIONS="bf16 fp16 fp32" NPROCS="1"
    [ "$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ] && NPROCS="1 2"
else
    PRECISIONS="fp32" NPROCS="2"
fi
TRAIN=(-m seq2seq.train "trainer.device=$DEVICE" "trainer.max_steps=$STEPS" "trainer.eval_every=$STEPS"
       "trainer.time_limit_minutes=null")
if ! "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('mplfonts') is None)"; then
    TRAIN+=("trainer.num_attention_samples=0" "attention_examples=[]")  # no CJK font to draw Chinese heatmaps with
    echo "note: mplfonts is not installed, so the trainings draw no attention heatmaps" | tee -a "$SUMMARY"
fi
LAST_MODEL="${MODELS##* }"

train_check() {  # train_check NAME PRECISION OVERRIDES...: train, then translate from the checkpoint
    local name="$1" precision="$2" run="$OUT/runs/$1" status; shift 2
    affordable "$name" 60 || return
    run_logged "$name" "$PYTHON" "${TRAIN[@]}" "trainer.precision=$precision" "hydra.run.dir=$run" "$@" "${EXTRA[@]}"
    status=$?
    if [ "$status" != 0 ]; then failed "$name" "$status" training; return; fi
    local loss nonfinite skipped speed translation
    loss="$(field "$run/results.json" valid_loss)" nonfinite="$(field "$run/results.json" nonfinite_steps)"
    skipped="$(field "$run/results.json" out_of_memory_steps)" speed="$(field "$run/results.json" target_tokens_per_s)"
    translation="$("$PYTHON" -m seq2seq.translate --checkpoint "$run/checkpoints/best.pt" --device "$DEVICE" \
                   --precision "$precision" 我是一个学生。 2>> "$OUT/logs/$name.log")"
    if "$PYTHON" -c "import math, sys; sys.exit(not math.isfinite(float(sys.argv[1])))" "$loss" \
            && [ "$nonfinite" = 0 ] && [ "$skipped" = 0 ] && [ -n "$translation" ]; then
        report "$name" PASS "valid loss $loss, $(printf '%.0f' "$speed") target tokens/s; 我是一个学生。 -> $translation"
        figure "$name.target_tokens_per_s" "$(printf '%.0f' "$speed")"
    else
        report "$name" FAIL "valid loss $loss, $nonfinite non-finite and $skipped skipped steps, translation '$translation'"
    fi
}

# 1-3. the families: bf16 first, then the other precisions, then torch.compile
for precision in $PRECISIONS; do
    for model in $MODELS; do
        train_check "$model-$precision" "$precision" "model=$model" trainer.compile=false
    done
done
if [ "$DEVICE" = cuda ]; then
    for model in $MODELS; do
        train_check "$model-bf16-compile" bf16 "model=$model" trainer.compile=true
    done
fi

# 4. torchrun (NCCL between GPUs, Gloo on the CPU): the command of the README's "Several GPUs and nodes"
for nproc in $NPROCS; do
    name="torchrun-nproc_$nproc" run="$OUT/runs/torchrun-nproc_$nproc"
    affordable "$name" 90 || continue
    run_logged "$name" "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$nproc" "${TRAIN[@]}" \
        "model=$LAST_MODEL" "hydra.run.dir=$run" "${EXTRA[@]}"
    status=$?
    if [ "$status" = 0 ] && [ -f "$run/results.json" ]; then
        replicas="$(grep -o 'replica weights identical on [0-9]* ranks' "$OUT/logs/$name.log" || echo "single rank")"
        report "$name" PASS "$replicas, world_size $(field "$run/results.json" world_size), results.json written"
    else
        failed "$name" "$status" torchrun
    fi
done

# 5. the GPU tests
if [ "$DEVICE" = cuda ] && affordable "pytest -m cuda" 120; then
    run_logged pytest "$PYTHON" -m pytest -q -m cuda
    status=$?
    if [ "$status" = 0 ]; then report "pytest -m cuda" PASS "$(tail -1 "$OUT/logs/pytest.log")"
    else failed pytest "$status" "pytest -m cuda"; fi
fi

# 6. the base-size Transformer benchmark (bf16 and torch.compile on a GPU)
if [ "$DEVICE" = cuda ]; then
    BENCH=(model=transformer model.d_model=512 model.num_heads=8 model.encoder_layers=6 model.decoder_layers=6
           model.ff_dim=2048 trainer.precision=bf16 trainer.max_tokens=16384 trainer.compile=true)
else
    BENCH=(--steps 2 --warmup 1 --phase-steps 1 "model=$LAST_MODEL")
fi
if affordable benchmark 150; then
    run_logged benchmark "$PYTHON" scripts/benchmark.py "trainer.device=$DEVICE" "${BENCH[@]}" "${EXTRA[@]}" \
        --json "$OUT/benchmark.json"
    status=$?
    if [ "$status" = 0 ]; then
        report benchmark PASS "$(grep -E '^(target tokens/s|MFU)' "$OUT/logs/benchmark.log" | tr -s ' ' | paste -sd';')"
        figure base_transformer.target_tokens_per_s "$(printf '%.0f' "$(field "$OUT/benchmark.json" training.target_tokens_per_s)")"
        figure base_transformer.mfu "$(field "$OUT/benchmark.json" mfu)"
    else
        failed benchmark "$status" scripts/benchmark.py
    fi
fi

# 7. decoding speed and BLEU over the test split: bf16 (where native) against fp32, greedy and beam 5
speed_run="$OUT/runs/speed-$LAST_MODEL"
if [ "$DEVICE" = cuda ]; then
    SPEED_TRAIN=("trainer.max_steps=null" "trainer.time_limit_minutes=$SPEED_MINUTES" "trainer.eval_every=1000000"
                 "trainer.precision=bf16")
    DECODE_PRECISIONS="bf16 fp32"
else
    SPEED_TRAIN=() DECODE_PRECISIONS="fp32"
fi
speed_seconds=$(awk -v minutes="$SPEED_MINUTES" -v cuda="$([ "$DEVICE" = cuda ] && echo 1 || echo 0)" \
                'BEGIN { printf "%d", cuda * minutes * 60 + 120 }')
if affordable speed-train "$speed_seconds"; then
    run_logged speed-train "$PYTHON" "${TRAIN[@]}" "model=$LAST_MODEL" "hydra.run.dir=$speed_run" "${SPEED_TRAIN[@]}" \
        "${EXTRA[@]}"
    status=$?
    if [ "$status" = 0 ]; then
        report speed-train PASS "$(field "$speed_run/results.json" steps) updates, test BLEU $(field "$speed_run/results.json" test_bleu)"
        for beam in 1 5; do
            for precision in $DECODE_PRECISIONS; do
                name="decode-$precision-beam_$beam"
                affordable "$name" 30 || continue
                run_logged "$name" "$PYTHON" -m seq2seq.evaluate --checkpoint "$speed_run/checkpoints/best.pt" \
                    --device "$DEVICE" --precision "$precision" --beam-size "$beam" --verbose --json "$OUT/$name.json"
                status=$?
                if [ "$status" != 0 ]; then failed "$name" "$status" seq2seq.evaluate; continue; fi
                bleu="$(field "$OUT/$name.json" bleu)"
                speed="$("$PYTHON" -c "import json, sys; r = json.load(open(sys.argv[1])); print(f\"{r['sentences'] / max(r['seconds'], 1e-9):.0f}\")" "$OUT/$name.json")"
                report "$name" PASS "BLEU $bleu, $speed sentences/s"
                figure "$name.bleu" "$bleu"
                figure "$name.sentences_per_s" "$speed"
            done
        done
    else
        failed speed-train "$status" "training the speed model"
    fi
fi

echo "summary: $SUMMARY ($(( $(date +%s) - STARTED )) s)"
[ "$FAILED" = 1 ] && exit 1
[ "$INCOMPLETE" = 1 ] && exit 3
exit 0
