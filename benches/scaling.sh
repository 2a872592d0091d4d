#!/usr/bin/env bash
# Thread scaling of the JIT engine: `cnnc bench` on the issue's two networks at 1, 2, 4, ...
# threads (up to the machine's cores), one table row per thread count: training step and
# inference times and their speedup over one thread.
#
# Usage: benches/scaling.sh [CNNC_BINARY] [MAX_THREADS]
#   CNNC_BINARY  a release build of the `cnnc` tool (default: target/release/cnnc); copy it
#                with this repository's examples/ to a machine without Rust to measure there
#   MAX_THREADS  the largest thread count (default: the number of cores, `nproc`)
#
# Each run is `cnnc bench FILE -b BATCH -j N --no-naive --no-reference -r REPS` (medians of
# REPS steps); set REPS (default 10) and CIFAR_BATCHES (default "32 128": batch 32 is the
# issue's, which leaves 2 samples per thread at 16 threads) in the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
cnnc=${1:-target/release/cnnc}
max=${2:-$(nproc)}
reps=${REPS:-10}
[ -x "$cnnc" ] || { echo "error: no cnnc binary at \`$cnnc\` (build it with \`cargo build --release\`)" >&2; exit 1; }
[[ "$max" =~ ^[1-9][0-9]*$ ]] || { echo "error: MAX_THREADS must be a positive integer, got \`$max\`" >&2; exit 1; }

threads=()
for ((j = 1; j <= max; j *= 2)); do threads+=("$j"); done
[ "${threads[-1]}" -eq "$max" ] || threads+=("$max")

# `fused JIT` row of `cnnc bench`: column 4 is inference ms, column 7 the training step's.
row() { grep -E '^fused JIT +[0-9]' | awk '{print $7, $4}'; }

run() {
    local name=$1 file=$2 batch=$3 base_step="" base_infer=""
    echo "$name, batch $batch"
    printf '%8s %14s %9s %14s %9s\n' threads "step ms" speedup "inference ms" speedup
    for j in "${threads[@]}"; do
        read -r step infer < <("$cnnc" bench "$file" -b "$batch" -j "$j" --no-naive --no-reference -r "$reps" 2>&1 | row)
        base_step=${base_step:-$step}
        base_infer=${base_infer:-$infer}
        awk -v j="$j" -v s="$step" -v i="$infer" -v bs="$base_step" -v bi="$base_infer" \
            'BEGIN { printf "%8d %14.2f %8.2fx %14.2f %8.2fx\n", j, s, bs / s, i, bi / i }'
    done
    echo
}

"$cnnc" --version
echo "cores: $(nproc), threads measured: ${threads[*]}, medians of $reps steps"
echo
run "LeNet-5" examples/models/lenet5.cnn 64
for b in ${CIFAR_BATCHES:-32 128}; do
    run "CIFAR inception" examples/models/cifar_inception.cnn "$b"
done
