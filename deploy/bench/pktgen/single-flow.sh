#!/usr/bin/env bash
#
# single-flow.sh: one UDP flow, from one source address and port to VIP:PORT, sent by every
# generator thread. The load balancer's best case: one flow-table entry, always hot, and one
# RSS hash, so on the load balancer node every packet lands on the same RX queue and CPU. It
# measures what one core of the data path forwards.
#
#   sudo ./single-flow.sh -i ens5 -d 10.0.100.10 -m 0a:1b:2c:3d:4e:5f -p 8080 -D 30
#
# See README.md for the two-host setup and how to read the results; -h for the options.
set -euo pipefail

PG_HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$PG_HERE/lib.sh"

PG_ABOUT="One UDP flow (one source address and port) to VIP:PORT from every thread: the load
balancer's best case, one flow on one RX queue."
PG_SCENARIO_HELP="  -S SRC     source address (default: the interface's IPv4 address, which pktgen
             picks; required with -6, where pktgen would pick the link-local one)"
PG_TAKES_K=0

# All packets are identical: build one and hand the driver the same buffer this many times.
CLONE_SKB=100000
# The flow's source port.
SRC_PORT=9

pg_parse_args "$@"

if [[ -n $SRC ]]; then
	if ((IPV6)); then
		pg_ip6_groups "$SRC" >/dev/null || pg_usage_error "-S: '$SRC' is not an IPv6 address"
	else
		pg_ip4_to_int "$SRC" >/dev/null || pg_usage_error "-S: '$SRC' is not an IPv4 address"
	fi
elif ((IPV6)); then
	pg_usage_error "missing -S SRC: with -6 give the source address (pktgen would send from the interface's link-local address)"
fi

pg_preflight

pg_ctrl reset || pg_die "writing 'reset' to $PG_PROC/pgctrl failed"
for ((i = 0; i < THREADS; i++)); do
	cpu=$((FIRST_CPU + i))
	pg_setup_thread "$cpu" 1
	dev=${PG_THREAD_DEVS[0]}
	pg_base_config "$dev" "$COUNT" 0
	pg_set "$dev" "clone_skb $CLONE_SKB"
	if [[ -n $SRC ]]; then
		if ((IPV6)); then
			pg_set "$dev" "src6 $SRC"
		else
			pg_set "$dev" "src_min $SRC"
			pg_set "$dev" "src_max $SRC"
		fi
	fi
	pg_set "$dev" "udp_src_min $SRC_PORT"
	pg_set "$dev" "udp_src_max $SRC_PORT"
done

pg_run
pg_report
