#!/usr/bin/env bash
# cnnc against PyTorch on the issue's networks, alternated: PAIRS rounds of one `cnnc bench`
# run and one `train_step.py` run (channels-last, PyTorch's faster layout here) back to back,
# each the median of REPS steps, so both see the same minutes of a noisy shared machine. Prints
# every pair and then, per network, the medians and the median of the per-pair ratios
# cnnc / PyTorch (below 1: cnnc faster) for the training step and for inference.
#
# Usage: benches/pytorch/compare.sh [PAIRS] [PYTHON]
#   PAIRS   rounds (default 10)
#   PYTHON  an interpreter with torch (default: python3), e.g. a venv made with
#           `python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.15.0 numpy`
# Environment: CNNC (default target/release/cnnc), THREADS (default 2), REPS (default 10),
# MODELS (default "cifar lenet").
set -euo pipefail
cd "$(dirname "$0")/../.."
pairs=${1:-10}
py=${2:-python3}
cnnc=${CNNC:-target/release/cnnc}
threads=${THREADS:-2}
reps=${REPS:-10}
models=${MODELS:-cifar lenet}
[ -x "$cnnc" ] || { echo "error: no cnnc binary at \`$cnnc\` (build it with \`cargo build --release\`)" >&2; exit 1; }
[[ "$pairs" =~ ^[1-9][0-9]*$ ]] || { echo "error: PAIRS must be a positive integer, got \`$pairs\`" >&2; exit 1; }
"$py" -c 'import torch' 2>/dev/null || { echo "error: \`$py\` cannot import torch (see the usage above)" >&2; exit 1; }

# The median of the numbers on standard input, one a line.
sort_median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }

for model in $models; do
    case $model in
        cifar) file=examples/models/cifar_inception.cnn batch=32 ;;
        lenet) file=examples/models/lenet5.cnn batch=64 ;;
        *) echo "error: MODELS holds \`$model\`; expected cifar or lenet" >&2; exit 1 ;;
    esac
    echo "$model, batch $batch, $threads threads, medians of $reps steps per run"
    printf '%5s %12s %12s %7s %14s %14s %7s\n' pair "cnnc step" "torch step" ratio "cnnc infer" "torch infer" ratio
    out=$(mktemp)
    for ((i = 1; i <= pairs; i++)); do
        # `fused JIT` row of `cnnc bench`: column 7 is the training step's ms, column 4 inference.
        read -r cs ci < <("$cnnc" bench "$file" -b "$batch" -j "$threads" --no-naive --no-reference -r "$reps" 2>/dev/null \
            | awk '/^fused JIT +[0-9]/ {print $7, $4}')
        read -r ts ti < <("$py" benches/pytorch/train_step.py --threads "$threads" --reps "$reps" --model "$model" --layout channels-last \
            | awk '/training step/ {for (k = 1; k <= NF; k++) { if ($k == "step") s = $(k + 1); if ($k == "inference") f = $(k + 1) } print s, f}')
        [ -n "${cs:-}" ] && [ -n "${ts:-}" ] || { echo "error: pair $i: a run printed no times" >&2; exit 1; }
        echo "$cs $ts $ci $ti" >>"$out"
        awk -v i="$i" -v cs="$cs" -v ts="$ts" -v ci="$ci" -v ti="$ti" \
            'BEGIN { printf "%5d %12.2f %12.2f %7.3f %14.2f %14.2f %7.3f\n", i, cs, ts, cs / ts, ci, ti, ci / ti }'
    done
    cs_m=$(awk '{print $1}' "$out" | sort_median); ts_m=$(awk '{print $2}' "$out" | sort_median)
    ci_m=$(awk '{print $3}' "$out" | sort_median); ti_m=$(awk '{print $4}' "$out" | sort_median)
    rs_m=$(awk '{print $1 / $2}' "$out" | sort_median); ri_m=$(awk '{print $3 / $4}' "$out" | sort_median)
    wins=$(awk '$1 < $2' "$out" | wc -l)
    printf '%5s %12.2f %12.2f %7.3f %14.2f %14.2f %7.3f\n' median "$cs_m" "$ts_m" "$rs_m" "$ci_m" "$ti_m" "$ri_m"
    echo "cnnc's step shorter in $wins of $pairs pairs (ratio column: the median of the per-pair ratios)"
    echo
    rm -f "$out"
done
