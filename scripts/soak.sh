#!/usr/bin/env bash
# Memory soak: `airmoe_bench layer --repeats N` loops forward + backward of
# the MoE layer N times on 3 ranks while this script samples every rank's
# resident memory (VmRSS) and the step rank 0 has reached. Asserts the memory
# stays flat: over the steps, the last quarter's peak is at most the first
# half's peak x 1.05 + 1 MiB, on every rank. The baseline is a half, not a
# quarter, because a short run's first quarter can end before the allocator
# has reached its working set (120 steps: +3.3 MiB from the first quarter to
# the last once in a loaded ctest, flat over 3,000 steps). glibc's mmap
# threshold is pinned at its default (MALLOC_MMAP_THRESHOLD_): left dynamic,
# it rises each time a large buffer is freed, after which buffers of up to
# that size come from the heap and are kept, and the resident memory of a
# short run stepped up by 1-5 MiB in its last quarter in about one rank in
# four once the routing kept each call's logits (scan_topk, about 1 MiB
# here; one rank in nine before), while 1,500 steps stayed flat at 40-43
# MiB; pinned, 120 steps moved by at most 0.2 MiB.
#
# usage: scripts/soak.sh AIRMOE_BENCH [STEPS (default 10000)] [WORKDIR]
#   STRATEGY (default air): the strategy that loops.
# Writes WORKDIR/rss.csv (seconds, step, one column of KiB per rank).
set -euo pipefail

bench="$(realpath "${1:?usage: soak.sh AIRMOE_BENCH [STEPS] [WORKDIR]}")"
steps="${2:-10000}"
work="$(realpath -m "${3:-soak_out}")"
strategy="${STRATEGY:-air}"
rm -rf "$work"
mkdir -p "$work"
log="$work/layer.log" csv="$work/rss.csv"

# Under timeout: 1 s a step is 3x the slowest this shape ran on a loaded
# 2-core machine.
timeout $((120 + steps)) mpiexec --allow-run-as-root --oversubscribe -n 3 \
  -x OMP_NUM_THREADS=1 -x MALLOC_MMAP_THRESHOLD_=131072 "$bench" layer -E 4096 -d 64 -T 768 --k 4 -C 32 -m 3 \
  --strategies "$strategy" --repeats "$steps" >"$log" 2>&1 &
job=$!
trap 'kill "$job" 2>/dev/null || true' EXIT
trap 'exit 143' INT TERM

# The ranks: mpiexec's children (it forks the local ones itself).
ranks=()
while ((${#ranks[@]} < 3)); do
  sleep 0.2
  mpiexec_pid="$(pgrep -P "$job" || true)"
  [ -z "$mpiexec_pid" ] || mapfile -t ranks < <(pgrep -P "$mpiexec_pid" | sort -n)
  kill -0 "$job" 2>/dev/null || break
done
echo "seconds,step$(printf ',rank_pid_%s_kib' "${ranks[@]}")" >"$csv"
start=$SECONDS
while kill -0 "$job" 2>/dev/null; do
  step="$(grep -o 'forward + backward [0-9]*' "$log" 2>/dev/null | tail -1 | grep -o '[0-9]*$' || true)"
  row="$((SECONDS - start)),${step:-0}"
  for pid in "${ranks[@]}"; do
    row+=",$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo)"
  done
  echo "$row" >>"$csv"
  # Often enough that a short run on an idle machine (120 steps in about 3 s)
  # still gives every quarter of the steps several samples.
  sleep 0.05
done
status=0
wait "$job" || status=$?
trap - EXIT
if [ "$status" -ne 0 ]; then
  echo "FAIL: the layer loop exited with status $status"
  tail -20 "$log"
  exit 1
fi

# Halves and quarters by step, over samples taken inside the loop (step >= 1) while
# every rank was alive (all columns filled).
/usr/bin/python3 - "$csv" "$steps" <<'EOF'
import csv
import sys

path, steps = sys.argv[1], int(sys.argv[2])
rows = [r for r in csv.reader(open(path))][1:]
rows = [[int(x) for x in r] for r in rows if all(r) and int(r[1]) >= 1]
if len(rows) < 8:
    sys.exit(f"FAIL: {len(rows)} samples inside the loop; need 8 (more steps?)")
first_rows = [r for r in rows if r[1] <= steps // 2]
last_rows = [r for r in rows if r[1] > steps - steps // 4]
if not first_rows or not last_rows:
    sys.exit(f"FAIL: no sample in the first half or the last quarter of the steps ({len(rows)} "
             "samples); run more steps")
ok = True
for col in range(2, len(rows[0])):
    first = max(r[col] for r in first_rows)
    last = max(r[col] for r in last_rows)
    limit = first * 1.05 + 1024
    print(f"rank {col - 2}: first-half peak {first} KiB, last-quarter peak {last} KiB "
          f"(limit {limit:.0f}), {len(rows)} samples over {steps} steps")
    ok &= last <= limit
sys.exit(0 if ok else "FAIL: resident memory grew")
EOF
echo "soak: ok"
