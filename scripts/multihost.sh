#!/usr/bin/env bash
# Multi-host launch on one machine: network namespaces as hosts (see
# scripts/netns_hosts.sh), mpirun with a hostfile and an rsh agent, over TCP
# (ob1) and over UCX. `airmoe_bench traffic` and `airmoe_bench layer` run on one
# host and on HOSTS hosts x SLOTS ranks; scripts/compare_runs.py then checks
# that routes and metered bytes are identical.
#
# usage: scripts/multihost.sh AIRMOE_BENCH [WORKDIR]
#   HOSTS (default 2), SLOTS (default 2) ranks per host.
# Exit status 77 (CTest's SKIP_RETURN_CODE) with the reason when this machine
# cannot make namespaces (not root, no iproute2, a container without
# CAP_NET_ADMIN). Needs root; every mpirun is bounded by `timeout`, and the
# namespaces, links and files go away on any exit.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bench="$(realpath "${1:?usage: multihost.sh AIRMOE_BENCH [WORKDIR]}")"
work="$(realpath -m "${2:-multihost_out}")"
hosts="${HOSTS:-2}" slots="${SLOTS:-2}"
ranks=$((hosts * slots))
# shellcheck source=scripts/netns_hosts.sh
source "$here/netns_hosts.sh"

if ! why="$(hosts_can_run)"; then
  echo "SKIPPED: $why"
  exit 77
fi

# A small shape: seconds, not minutes, on a shared 2-core machine.
traffic_args=(-E 3001 -d 24 -T 301 --k 4 -C 29 -m 3 --repeats 1)
layer_args=(-E 4096 -d 64 -T 1024 --k 4 -C 64 -m 3 --repeats 1)

# run_both OUTDIR LAUNCHER...: both benchmarks under LAUNCHER, figures to OUTDIR.
run_both() {
  local out="$1"
  shift
  mkdir -p "$out"
  echo "+ $* airmoe_bench traffic|layer -> $out"
  timeout 120 "$@" "$bench" traffic "${traffic_args[@]}" --save-routes "$out" \
    --json "$out/traffic.json" >"$out/traffic.log" 2>&1 || {
    tail -20 "$out/traffic.log"
    return 1
  }
  timeout 120 "$@" "$bench" layer "${layer_args[@]}" --json "$out/layer.json" \
    >"$out/layer.log" 2>&1 || {
    tail -20 "$out/layer.log"
    return 1
  }
}

rm -rf "$work"
mkdir -p "$work"
run_both "$work/one_host" env OMP_NUM_THREADS=1 mpiexec --allow-run-as-root --oversubscribe \
  -n "$ranks"

hosts_up "$hosts"
echo "hosts: ${HOSTS_NAMES[*]} on $HOSTS_SUBNET (mpirun at $HOSTS_BRIDGE_IP)"
for transport in tcp ucx; do
  hosts_mpirun_args "$transport" "$slots"
  run_both "$work/${hosts}hosts_$transport" "${HOSTS_MPIRUN[@]}"
done
hosts_down

/usr/bin/python3 "$here/compare_runs.py" "$work/one_host" "$work/${hosts}hosts_tcp" \
  "$work/${hosts}hosts_ucx"
