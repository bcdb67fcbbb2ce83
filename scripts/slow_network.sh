#!/usr/bin/env bash
# The MoE layer across namespace hosts on a slowed network: `airmoe_bench
# layer` (the three strategies) on HOSTS x SLOTS ranks over TCP, once per link
# setting, with each host's eth0 shaped by tc: netem (delay + rate) where the
# kernel has it; otherwise tbf for the rate alone, and for delay + rate the
# ranks' data goes over scripts/delay_wire.py (a user-space hub) instead. The
# setting's label says which.
#
# usage: [SETTINGS="unshaped wire_5ms_1gbit ..."] scripts/slow_network.sh AIRMOE_BENCH OUTDIR [LAYER ARGS...]
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

# label -> how: "qdisc ARGS" (tc on each host's eth0; "qdisc" alone: none) or
# "wire DELAY_MS RATE_MBIT" (scripts/delay_wire.py, a user-space hub).
declare -A setting=([unshaped]="qdisc")
order=(unshaped)
if hosts_shape "netem delay 5ms" 2>/dev/null; then
  setting[netem_5ms_1gbit]="qdisc netem delay 5ms rate 1gbit"
  setting[netem_20ms_100mbit]="qdisc netem delay 20ms rate 100mbit"
  order+=(netem_5ms_1gbit netem_20ms_100mbit)
else
  echo "this kernel has no netem qdisc (sch_netem): rate with tbf, delay with delay_wire.py"
  setting[tbf_1gbit]="qdisc tbf rate 1gbit burst 512kb latency 50ms"
  setting[tbf_100mbit]="qdisc tbf rate 100mbit burst 64kb latency 50ms"
  setting[tbf_10mbit]="qdisc tbf rate 10mbit burst 16kb latency 200ms"
  setting[wire_5ms_1gbit]="wire 5 1000"
  setting[wire_20ms_100mbit]="wire 20 100"
  order+=(tbf_1gbit tbf_100mbit tbf_10mbit wire_5ms_1gbit wire_20ms_100mbit)
fi

# SETTINGS="label ...": only these (the first is the table's baseline).
[ -z "${SETTINGS:-}" ] || read -ra order <<<"$SETTINGS"

# apply_setting HOW...: the network as the setting says, and the mpirun line.
apply_setting() {
  local how="$1"
  shift
  hosts_shape ""
  hosts_wire_stop
  case "$how" in
    qdisc) hosts_shape "$*" ;;
    wire) hosts_wire "$1" "$2" ;;
  esac
  hosts_mpirun_args tcp "$slots"
}

files=()
for label in "${order[@]}"; do
  # shellcheck disable=SC2086  # the setting's words
  apply_setting ${setting[$label]}
  echo "+ [$label: ${setting[$label]}] airmoe_bench layer ${layer_args[*]}"
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
