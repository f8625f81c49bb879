#!/usr/bin/env bash
# Before/after comparison of benchmarks/acdc_overhead.py: a commit, checked out in a git worktree, against
# this checkout, run in turn (before, after, before, after, ...) in fresh processes, each run's JSON kept.
#
#   benchmarks/acdc_overhead_ab.sh BEFORE OUT_DIR RUNS [acdc_overhead.py flags...]
#   benchmarks/acdc_overhead_ab.sh 57f4a44 benchmarks/results/acdc_overhead_ab/57f4a44 3 \
#       --backbones resnet18 resnet10 --batch 5 --rounds 21
#
# The ratios depend on the state of glibc's allocator (benchmarks/README.md); to pin it, export
# MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=268435456 first. Prints one line per run and
# backbone/batch: version, run, dense ms, ACDC ms, ratio (median of per-round ratios), IQR.
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 BEFORE OUT_DIR RUNS [acdc_overhead.py flags...]" >&2
    exit 2
fi
before=$1 out=$2 runs=$3
shift 3
case $runs in '' | *[!0-9]* | 0)
    echo "RUNS must be a whole number >= 1, got '$runs'" >&2
    exit 2
    ;;
esac
if [ -e "$out" ] && [ -n "$(ls -A "$out")" ]; then
    echo "OUT_DIR $out exists and is not empty: give a new folder" >&2
    exit 2
fi
here=$(cd "$(dirname "$0")/.." && pwd)
commit=$(git -C "$here" rev-parse --verify --quiet "$before^{commit}") || {
    echo "BEFORE '$before' is not a commit of $here" >&2
    exit 2
}
tree=$(mktemp -d)
results=$(mktemp -d)  # moved to OUT_DIR once every run has finished
trap 'git -C "$here" worktree remove --force "$tree" >/dev/null 2>&1 || true; rm -rf "$tree" "$results"' EXIT
git -C "$here" worktree add --detach --force "$tree" "$commit" >/dev/null 2>&1
for i in $(seq 1 "$runs"); do
    for version in before after; do
        root=$here
        [ "$version" = before ] && root=$tree
        json=$results/${version}_$i.json
        (cd "$root" && PYTHONPATH="$root" python benchmarks/acdc_overhead.py "$@" --out "$json" >/dev/null)
        python - "$json" "$version" "$i" <<'EOF'
import json, sys
path, version, run = sys.argv[1:]
for name, batches in json.load(open(path))["backbones"].items():
    for batch, row in batches.items():
        print(f"{version} {run} {name} b{batch}: dense {row['dense_ms']} ms, acdc {row['acdc_ms']} ms, "
              f"ratio {row['ratio']} (IQR {row['ratio_iqr']})")
EOF
    done
done
mkdir -p "$out"
mv "$results"/*.json "$out"/
echo "wrote $runs before/after pairs to $out"
