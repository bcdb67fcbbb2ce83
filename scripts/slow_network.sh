#!/usr/bin/env bash
# The MoE layer across namespace hosts on a slowed network: `airmoe_bench
# layer` (the three strategies) on HOSTS x SLOTS ranks over TCP, once per link
# setting, with each host's eth0 shaped by tc. netem (delay + rate) where the
# kernel has it; otherwise tbf (rate only; the setting's label says which).
#
# usage: scripts/slow_network.sh AIRMOE_BENCH OUTDIR [LAYER ARGS...]
# Writes OUTDIR/multinode_<setting>.json per setting and prints the table of
# scripts/multinode_table.py. Needs root (exit 77 with the reason otherwise).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bench="$(realpath "${1:?usage: slow_network.sh AIRMOE_BENCH OUTDIR [LAYER ARGS...]}")"
out="$(realpath -m "${2:?usage: slow_network.sh AIRMOE_BENCH OUTDIR [LAYER ARGS...]}")"
shift 2
layer_args=("$@")
((${#layer_args[@]})) || layer_args=(-E 16384 -d 256 -T 2048 --k 8 -C 128 -m 4 --repeats 3)
hosts="${HOSTS:-2}" slots="${SLOTS:-2}"
# shellcheck source=scripts/netns_hosts.sh
source "$here/netns_hosts.sh"

if ! why="$(hosts_can_run)"; then
  echo "SKIPPED: $why"
  exit 77
fi
mkdir -p "$out"
hosts_up "$hosts"

# label -> qdisc arguments ("" = the veth as it is).
declare -A qdisc=([unshaped]="")
order=(unshaped)
if hosts_shape "netem delay 5ms" 2>/dev/null; then
  qdisc[netem_5ms_1gbit]="netem delay 5ms rate 1gbit"
  qdisc[netem_20ms_100mbit]="netem delay 20ms rate 100mbit"
  order+=(netem_5ms_1gbit netem_20ms_100mbit)
else
  echo "this kernel has no netem qdisc (sch_netem): shaping the rate only, with tbf"
  qdisc[tbf_1gbit]="tbf rate 1gbit burst 512kb latency 50ms"
  qdisc[tbf_100mbit]="tbf rate 100mbit burst 64kb latency 50ms"
  qdisc[tbf_10mbit]="tbf rate 10mbit burst 16kb latency 200ms"
  order+=(tbf_1gbit tbf_100mbit tbf_10mbit)
fi

hosts_mpirun_args tcp "$slots"
files=()
for label in "${order[@]}"; do
  hosts_shape "${qdisc[$label]}"
  echo "+ [$label: ${qdisc[$label]:-no qdisc}] airmoe_bench layer ${layer_args[*]}"
  timeout 600 "${HOSTS_MPIRUN[@]}" "$bench" layer "${layer_args[@]}" \
    --json "$out/multinode_$label.json" >"$out/multinode_$label.log" 2>&1 ||
    {
      tail -20 "$out/multinode_$label.log"
      exit 1
    }
  files+=("$out/multinode_$label.json")
done
hosts_down
/usr/bin/python3 "$here/multinode_table.py" "${files[@]}"
