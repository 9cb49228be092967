#!/usr/bin/env bash
# The kernel bench runs of docs/benchmarks.md, for an older commit and for this checkout, back to back.
#   benchmarks/bench_before_after.sh REV [OUT_DIR]
# Each run writes OUT_DIR/{before,after}_{prefill,decode,bf16}.json (`bench layer --json`).
# Check `cat /proc/loadavg` is below ~1 first: the bench wants both cores.
set -euo pipefail
rev=${1:?usage: $0 REV [OUT_DIR]}
out=$(realpath -m "${2:-bench-before-after}")
here=$(git rev-parse --show-toplevel)
before=$(mktemp -d)/before
git -C "$here" worktree add -q --detach "$before" "$rev"
trap 'git -C "$here" worktree remove --force "$before"' EXIT
mkdir -p "$out"
prefill=(--tokens 4096 --hidden 512 --experts 8,32,128 --repeats 3
         --impls "moe_convert,deepspeed,einsum,hf_grouped_mm,dense_ffn,moe_convert[loop]")
decode=(--tokens 8 --experts 128 --repeats 15)
bf16=(--tokens 4096 --experts 8 --dtype bf16 --impls moe_convert,deepspeed,dense_ffn --repeats 3)
for run in prefill decode bf16; do
  declare -n args=$run
  for side in before after; do
    tree=$([ $side = before ] && echo "$before" || echo "$here")
    echo "$side $run (load $(cut -d' ' -f1 /proc/loadavg))"
    # run from the tree itself: `python -m` puts the working directory first on sys.path
    (cd "$tree" && python -m moe_convert.cli bench layer "${args[@]}" --json) > "$out/${side}_$run.json"
  done
done
echo "results in $out"
