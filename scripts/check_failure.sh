#!/usr/bin/env bash
# Failure behaviour of a job under mpiexec: it must end, on every rank, within
# 30 s, with a message that names the rank at fault; it must never hang.
#
# usage: scripts/check_failure.sh killed-rank|bad-token AIRMOE_BENCH [WORKDIR]
#        scripts/check_failure.sh bad-token-midstep AIRMOE_MIDSTEP_FAULT [WORKDIR]
#   killed-rank  `airmoe_bench layer` on 3 ranks, looping forward + backward;
#                once rank 0 reports step 3, rank 1 gets SIGKILL. Asserts
#                mpiexec exits non-zero within 30 s of the kill and says which
#                rank was lost.
#   bad-token    `airmoe_bench layer` on 3 ranks with --tokens whose last row
#                (rank 2's block) holds a NaN. Asserts every rank is gone
#                within 30 s, non-zero, and the error names rank 2 and the row.
#   killed-host  (root) 2 namespace hosts x 2 ranks; at step 3 every process
#                on host 1 gets SIGKILL. Asserts mpirun exits non-zero within
#                30 s and says it lost a daemon. Exit 77 where namespaces cannot
#                be made.
#   bad-token-midstep  tests/launch/midstep_fault.cpp on 3 ranks, each strategy:
#                the NaN reaches the layer in step 3 of 5. Asserts every rank
#                raised in step 3 (UsageError on rank 2, PeerError naming rank 2
#                elsewhere), steps 4 and 5 ran, and the job ended 0 within 30 s.
# Prints "seconds to exit" and the message, for docs/multinode.md. Every run is
# bounded by `timeout 120`.
set -euo pipefail

mode="${1:?usage: check_failure.sh MODE PROGRAM [WORKDIR] (MODE: see the header)}"
bench="$(realpath "${2:?usage: check_failure.sh MODE AIRMOE_BENCH [WORKDIR]}")"
work="$(realpath -m "${3:-failure_out}")"
limit=30
rm -rf "$work"
mkdir -p "$work"
log="$work/$mode.log"
# MPIEXEC_FLAGS: more mpiexec options, to see what a setting changes (e.g.
# "--enable-recovery", docs/multinode.md).
# shellcheck disable=SC2206  # the flags are words on purpose
launch=(timeout 120 mpiexec --allow-run-as-root --oversubscribe -n 3 -x OMP_NUM_THREADS=1
  ${MPIEXEC_FLAGS:-})
layer_args=(layer --k 4 -C 16 -m 3 --strategies air --placement list)

now() { date +%s.%N; }
elapsed() { python3 -c "print(f'{$2 - $1:.2f}')"; }

# The PID of the process among mpiexec's children that is MPI rank $2.
rank_pid() {
  local parent="$1" rank="$2" pid
  for pid in $(pgrep -P "$parent"); do
    if tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$rank"; then
      echo "$pid"
      return 0
    fi
  done
  return 1
}

# Waits (up to 60 s) for $2 to appear in the log $1.
wait_for_line() {
  local deadline=$((SECONDS + 60))
  until grep -qs "$2" "$1"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.1
  done
}

# Asserts the job ended non-zero within $limit s of $1 (a `now` time), and that
# the log names the rank; prints the figures.
check_exit() {
  local t0="$1" status="$2" pattern="$3" seconds
  seconds="$(elapsed "$t0" "$(now)")"
  echo "$mode: mpiexec exit status $status, seconds to exit $seconds"
  echo "$mode: message:"
  grep -E "$pattern" "$log" | sed 's/^/    /'
  if [ "$status" -eq 0 ] || [ "$status" -eq 124 ]; then
    echo "FAIL: the job should end non-zero, and not by timeout 120 (status $status)"
    exit 1
  fi
  python3 -c "import sys; sys.exit(0 if $seconds <= $limit else 1)" ||
    {
      echo "FAIL: $seconds s > $limit s"
      exit 1
    }
  grep -qE "$pattern" "$log" || {
    echo "FAIL: no message matching '$pattern' in $log:"
    tail -20 "$log"
    exit 1
  }
  echo "$mode: ok"
}

killed_rank() {
  "${launch[@]}" "$bench" "${layer_args[@]}" -E 4096 -d 64 -T 1536 --repeats 100000 \
    >"$log" 2>&1 &
  local job=$! mpiexec_pid victim t0 status=0
  wait_for_line "$log" "forward + backward 3/" || {
    echo "FAIL: the job never reached step 3"
    tail "$log"
    kill "$job"
    exit 1
  }
  mpiexec_pid="$(pgrep -P "$job")"
  victim="$(rank_pid "$mpiexec_pid" 1)"
  t0="$(now)"
  kill -KILL "$victim"
  wait "$job" || status=$?
  check_exit "$t0" "$status" "rank 1 .*(signal 9|Killed)"
}

bad_token() {
  /usr/bin/python3 - "$work" <<'EOF'  # Debian's, with NumPy
import sys
import numpy as np
rng = np.random.default_rng(5)
centers = rng.standard_normal((512, 16)).astype(np.float32)
tokens = rng.standard_normal((96, 16)).astype(np.float32)
tokens[95, 3] = np.nan  # the last row: rank 2's block of 32 at P = 3
np.save(f"{sys.argv[1]}/centers.npy", centers)
np.save(f"{sys.argv[1]}/tokens.npy", tokens)
EOF
  local t0 status=0
  t0="$(now)"
  "${launch[@]}" "$bench" "${layer_args[@]}" --centers "$work/centers.npy" \
    --tokens "$work/tokens.npy" --repeats 1 >"$log" 2>&1 || status=$?
  check_exit "$t0" "$status" "rank 2: error: .*row [0-9]+ .*nan"
}

# A whole host lost: the namespace-hosts of scripts/netns_hosts.sh, 2 hosts x
# 2 ranks over TCP; once rank 0 reports step 3, every process on host 1 (its
# orted and ranks 2, 3) gets SIGKILL, as when a node dies.
killed_host() {
  # shellcheck source=scripts/netns_hosts.sh
  source "$(dirname "${BASH_SOURCE[0]}")/netns_hosts.sh"
  local why
  if ! why="$(hosts_can_run)"; then
    echo "SKIPPED: $why"
    exit 77
  fi
  hosts_up 2
  hosts_mpirun_args tcp 2
  timeout 120 "${HOSTS_MPIRUN[@]}" "$bench" "${layer_args[@]}" -E 4096 -d 64 -T 1536 \
    --repeats 100000 >"$log" 2>&1 &
  local job=$! t0 status=0
  wait_for_line "$log" "forward + backward 3/" || {
    echo "FAIL: the job never reached step 3"
    tail "$log"
    kill "$job"
    exit 1
  }
  t0="$(now)"
  # shellcheck disable=SC2046  # one PID a word
  kill -KILL $(ip netns pids "${HOSTS_NAMES[1]}")
  wait "$job" || status=$?
  check_exit "$t0" "$status" "(lost communication|daemon).*"
}

# midstep_fault prints "rank R step S <outcome>"; every rank's step 3 must be
# the error, and every other step "ok".
bad_token_midstep() {
  local strategy t0 status
  for strategy in air dense-replicated dense-broadcast; do
    t0="$(now)"
    status=0
    "${launch[@]}" "$bench" "$strategy" >"$log" 2>&1 || status=$?
    echo "$mode $strategy: exit status $status, seconds $(elapsed "$t0" "$(now)")"
    sed 's/^/    /' "$log"
    [ "$status" -eq 0 ] || {
      echo "FAIL: $strategy: status $status"
      exit 1
    }
    if [ "$(grep -c ' ok$' "$log")" -ne 12 ] ||
      ! grep -q "^rank 2 step 3 UsageError: .*rank 2: .*row [0-9]* column 0 is nan" "$log" ||
      [ "$(grep -c "^rank [01] step 3 PeerError (failed rank 2): .*rank 2: .*nan" "$log")" -ne 2 ]; then
      echo "FAIL: $strategy: expected steps 1, 2, 4, 5 ok on 3 ranks and step 3 raised on all"
      exit 1
    fi
  done
  echo "$mode: ok"
}

case "$mode" in
  killed-rank) killed_rank ;;
  bad-token) bad_token ;;
  bad-token-midstep) bad_token_midstep ;;
  killed-host) killed_host ;;
  *)
    echo "unknown mode '$mode' (killed-rank, bad-token or bad-token-midstep)"
    exit 2
    ;;
esac
