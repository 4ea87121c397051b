#!/usr/bin/env bash
# The GPU measurements of docs/performance.md ("On a GPU") in one go, on a machine with NVIDIA GPUs:
#
#   bash scripts/gpu_checks.sh [OUT_FOLDER] [SECONDS]      # defaults: gpu-checks/, 540
#
# In order of importance, each step only if the time left of SECONDS allows it (a skipped step is said):
#   1. the GPU speedrun preset three times (its whole-split val loss, seconds of training, whole process),
#      the third with evals every 50 steps for its loss curve
#   2. nanoGPT's recipe (config/shakespeare_char.toml), its first 2,000 steps, for the curve beside it
#   3. the GPT-2 (124M) preset's training step, compiled and eager: bench.py's table (tokens/s, MFU,
#      step ms, peak memory) and where the time goes (torch.profiler); compiled again with the vocabulary
#      padded to 50,304
#   4. FSDP against DDP on every GPU, eager and compiled: the same losses, tokens/s, and an exact resume
#   5. the speedrun's neighbours (CUDA graphs; no dropout; nanoGPT's batch), to tune it
#   6. the tests that need a GPU, and the CPU's FSDP tests with a GPU in the machine (FSDP's own default)
# OUT_FOLDER/summary.txt gets one line per step and the figures; OUT_FOLDER/speedrun_vs_recipe.png the two
# curves against seconds of training (scripts/compare_runs.py); OUT_FOLDER/logs.tar.gz the logs and profiles.
# Needs PyTorch with CUDA, numpy, tiktoken, tqdm, matplotlib and pytest; the char-level Shakespeare dataset is
# prepared first (a download) unless DATA_DIR/shakespeare_char/ is there (DATA_DIR: data/ unless set), and
# without it nothing else runs. PYTHON names the interpreter (python3 unless set).
set -u
out=$(realpath -m "${1:-gpu-checks}")
budget=${2:-540}
if ! [[ $budget =~ ^[0-9]+$ ]]; then
    echo "error: SECONDS must be a whole number of seconds, got '$budget'" >&2
    exit 2
fi
data=$(realpath -m "${DATA_DIR:-data}")  # before the cd: a relative DATA_DIR is the caller's
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
gpus=$($py -c "import torch; print(torch.cuda.device_count())") || exit 2
if [ "$gpus" = 0 ]; then
    echo "error: PyTorch sees no CUDA GPU here; these checks are for a machine with NVIDIA GPUs" >&2
    exit 2
fi
rm -rf "$out/runs"  # a rerun starts its runs afresh rather than stop at their old checkpoints
mkdir -p "$out/logs"
summary="$out/summary.txt"

say() { echo "$*" | tee -a "$summary"; }

# run NAME NEEDS_SECONDS CMD...: CMD with its output in logs/NAME.log, unless fewer than NEEDS_SECONDS are left
run() {
    local name=$1 needs=$2
    shift 2
    local left=$((budget - SECONDS))
    if ((left < needs)); then
        say "$name: skipped ($left s left, needs about $needs)"
        return 1
    fi
    local start=$SECONDS
    timeout -k 20 "$left" "$@" >"$out/logs/$name.log" 2>&1  # SIGTERM (a run saves and stops), then SIGKILL
    local rc=$?
    say "$name: exit $rc, $((SECONDS - start)) s wall | $(grep -aE 'steps in|final val loss' "$out/logs/$name.log" |
        sed -E 's/ \(evals.*//; s/ on the whole.*//' | tr '\n' ' ')"
    return $rc
}

say "$(date -u +%FT%TZ) | $(nvidia-smi -L 2>/dev/null | head -1) | $gpus GPU(s) | $($py -c \
    'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")')"
[ -f "$data/shakespeare_char/meta.json" ] ||
    $py data/prepare.py --dataset=shakespeare_char --data_dir="$data" >"$out/logs/prepare.log" 2>&1
if ! [ -f "$data/shakespeare_char/meta.json" ]; then  # offline: every run would try the download again, and fail
    say "no dataset: $data/shakespeare_char could not be prepared ($(tail -1 "$out/logs/prepare.log")); bring it" \
        "along (python data/prepare.py --dataset=shakespeare_char --data_dir=$data --input=<tinyshakespeare.txt>)"
    exit 2
fi

speedrun=config/shakespeare_char_gpu_speedrun.toml
for i in 1 2 3; do
    curve=() logs=()
    [ "$i" = 1 ] && logs=(env TORCH_LOGS=recompiles)  # each graph compiled after the first, and why
    [ "$i" = 3 ] && curve=(--eval_interval=50 --eval_iters=20)
    run "speedrun_$i" 60 "${logs[@]}" $py train.py $speedrun --data_dir="$data" --out_dir="$out/runs/speedrun_$i" \
        "${curve[@]}"
done
say "speedrun_1: graphs compiled after the first: $(grep -ac 'Recompiling function' "$out/logs/speedrun_1.log") (the evals' is one)"
run recipe_2000 90 $py train.py config/shakespeare_char.toml --data_dir="$data" --out_dir="$out/runs/recipe" \
    --max_iters=2000 --attn_log_interval=0
$py scripts/compare_runs.py --runs="$out/runs/speedrun_3,$out/runs/recipe" --target=1.4697 \
    --out="$out/speedrun_vs_recipe.png" >>"$summary" 2>&1  # the curves side by side, and when each got there

# compiled, then eager in a process of its own: the eager step holds more activations, and should it not fit the
# GPU, the compiled figures are already taken
gpt2=config/gpt2_124m.toml:hellaswag_interval=0
for mode in compiled eager; do
    flag=$([ $mode = eager ] && echo ":compile=false")
    run "bench_124m_$mode" 150 $py bench.py --what=train_step --vocab_size=50257 --repeats=3 --profile_steps=1 \
        --profile="$out/logs/profile_124m_$mode" --preset="$gpt2$flag" &&  # the table and where the time went
        sed -n '/^train_step |/,$p' "$out/logs/bench_124m_$mode.log" | grep -v USDT >>"$summary"
done
# the same step with the vocabulary padded to a multiple of 64 (50,304), as nanoGPT and llm.c train GPT-2: what an
# evenly tiled head and cross-entropy would buy, before glimpse offers it
run bench_124m_vocab50304 120 $py bench.py --what=train_step --vocab_size=50304 --repeats=3 --preset="$gpt2" &&
    sed -n '/^train_step |/,$p' "$out/logs/bench_124m_vocab50304.log" | grep -v USDT >>"$summary"

# nanoGPT's GPU preset for 200 steps on every GPU, one micro-step each, under DDP and FSDP
every_gpu=($py -m torch.distributed.run --standalone --nproc_per_node="$gpus" train.py config/shakespeare_char.toml
           --data_dir="$data" --max_iters=200 --eval_interval=100 --eval_iters=20 --attn_log_interval=0
           --log_interval=10 --gradient_accumulation_steps="$gpus")
run ddp_200 60 "${every_gpu[@]}" --out_dir="$out/runs/ddp"
run fsdp_200 60 "${every_gpu[@]}" --fsdp=true --out_dir="$out/runs/fsdp"
run fsdp_compiled_200 90 "${every_gpu[@]}" --fsdp=true --compile=true --out_dir="$out/runs/fsdp_compiled"
run fsdp_100 60 "${every_gpu[@]}" --fsdp=true --max_iters=100 --out_dir="$out/runs/fsdp_resumed" &&
    run fsdp_resume_200 60 "${every_gpu[@]}" --fsdp=true --init_from=resume --out_dir="$out/runs/fsdp_resumed"
$py - "$out/runs" "$gpus" >>"$summary" 2>&1 <<'EOF'
import json, sys
from pathlib import Path
def losses(name):
    path = Path(sys.argv[1]) / name / "metrics.jsonl"
    if not path.exists():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["iter"]: r["train_loss"] for r in records if r.get("train_loss") is not None}  # null: not finite
def compare(what, a, b, after=0):
    shared = [i for i in a.keys() & b.keys() if i > after] if a and b else []
    if shared:  # flash attention's backward is not deterministic on a GPU: differences within rounding are expected
        diff = max(abs(a[i] - b[i]) for i in shared)
        print(f"{what}: largest train-loss difference {diff:.2e} over the {len(shared)} logs both have")
    else:
        print(f"{what}: nothing to compare (a run missing or cut short)")
ddp, fsdp = losses("ddp"), losses("fsdp")
plain = "ddp" if int(sys.argv[2]) > 1 else "one process unsharded"  # torchrun with one process wraps no DDP
compare(f"fsdp vs {plain}", ddp, fsdp)
compare(f"fsdp compiled vs {plain}", ddp, losses("fsdp_compiled"))
compare("fsdp resumed at step 100 vs straight, after step 100", fsdp, losses("fsdp_resumed"), after=100)
EOF

run speedrun_cuda_graphs 60 env TORCH_LOGS=cudagraphs,perf_hints $py train.py $speedrun --data_dir="$data" \
    --out_dir="$out/runs/speedrun_cuda_graphs" --compile_mode=reduce-overhead
say "speedrun_cuda_graphs: $(grep -ac 'skipping cudagraphs' "$out/logs/speedrun_cuda_graphs.log") graphs left" \
    "unrecorded (the log says why)"
run speedrun_no_dropout 60 $py train.py $speedrun --data_dir="$data" --out_dir="$out/runs/speedrun_no_dropout" \
    --dropout=0.0
run speedrun_batch64 75 $py train.py $speedrun --data_dir="$data" --out_dir="$out/runs/speedrun_batch64" \
    --batch_size=64 \
    --max_iters=800 --lr_decay_iters=800
run gpu_tests 90 $py -m pytest -q -x tests/test_train.py tests/test_arch.py -k cuda
run fsdp_tests 120 $py -m pytest -q -x tests/test_fsdp.py

rm -rf "$out/runs"/*/ckpt.* "$out/runs"/*/best.pt  # the weights are not needed; the metrics are
tar -czf "$out/logs.tar.gz" -C "$out" logs runs 2>/dev/null
say "done in $SECONDS s"
