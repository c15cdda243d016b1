#!/usr/bin/env bash
#
# spoofed-flood.sh: a flood with a new, random source address (and source port) in every
# packet: flag IPSRC_RND over a large range, and no buffer reuse (clone_skb 0), so no two
# consecutive packets share a source. The rate limiter's worst case: nearly every packet is a
# source it has not seen, so every packet costs a source-table insert (or, once the table is
# full, its overflow path), and no source ever reaches its limit. The default range is the whole
# RFC 2544 benchmarking block 198.18.0.0/15 (131072 addresses, twice the agent's default source
# table of 65536).
#
# IPv6: pktgen cannot randomise an IPv6 source (only the destination). With -6 each thread
# cycles through -k streams (pktgen devices) with fixed sources, one per /64 of the -S /48
# (default 2001:2::/48), so the limiter sees threads x k sources over and over: a flood from
# many sources, but not a new source per packet. The script warns about it; use IPv4 for the
# worst case.
#
# Spoofed sources: only against your own load balancer, and keep the range inside a lab range
# that routes nowhere (the defaults are benchmarking blocks). See README.md.
#
#   sudo ./spoofed-flood.sh -i ens5 -d 10.0.100.10 -m 0a:1b:2c:3d:4e:5f -p 8080 -D 30
set -euo pipefail

PG_HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$PG_HERE/lib.sh"

PG_ABOUT="A flood from random spoofed sources to VIP:PORT, a new source address every packet
(IPv4): the rate limiter's worst case."
PG_SCENARIO_HELP="  -S RANGE   IPv4 sources, drawn at random for every packet: FIRST-LAST or ADDRESS/LEN
             (default 198.18.0.0/15); with -6 a /48 (default 2001:2::/48): source n is
             <prefix>:<n>::1, and sources cycle rather than change every packet
  -k N       with -6: sources (pktgen devices) per thread (default 16; ~1.5 MiB kernel
             memory each)"
PG_TAKES_K=1
PG_DEFAULT_K=16

DEFAULT_SRC4=198.18.0.0/15
DEFAULT_SRC6=2001:2::/48
# Every packet must differ: build each one afresh (pktgen applies IPSRC_RND and UDPSRC_RND
# when it builds a packet, so a reused buffer would repeat its source).
CLONE_SKB=0
SRC_PORT_MIN=1024
SRC_PORT_MAX=65535

pg_parse_args "$@"

# burst hands the driver the same buffer BURST times: BURST packets from one source.
((BURST == 1)) || pg_usage_error "-b: the spoofed flood sends every packet from a new source; burst must be 1 (got $BURST)"

if ((IPV6)); then
	pg_ip6_prefix48 -S "${SRC:-$DEFAULT_SRC6}"
	sources=$((THREADS * SRCS_PER_THREAD))
	((sources <= 65536)) || pg_usage_error "-k: $THREADS threads x $SRCS_PER_THREAD sources exceeds the /48's 65536 /64s"
	pg_warn "IPv6: pktgen cannot randomise IPv6 sources; cycling through $sources fixed sources ($PG_SRC6_PREFIX:<n>::1), not a new source per packet"
else
	pg_ip4_range -S "${SRC:-$DEFAULT_SRC4}"
	sources=$((PG_SRC_MAX - PG_SRC_MIN + 1))
	((sources >= 2)) || pg_usage_error "-S: a flood of random sources needs a range, not one address"
	pg_info "random sources from $(pg_int_to_ip4 "$PG_SRC_MIN")-$(pg_int_to_ip4 "$PG_SRC_MAX") ($sources addresses) on every thread"
fi

pg_preflight

# Several devices on one thread take turns only with a delay (see many-sources.sh).
delay=0
((SRCS_PER_THREAD == 1)) || delay=1
per_dev_count=$(pg_per_device_count "$SRCS_PER_THREAD")

pg_ctrl reset || pg_die "writing 'reset' to $PG_PROC/pgctrl failed"
for ((i = 0; i < THREADS; i++)); do
	cpu=$((FIRST_CPU + i))
	pg_setup_thread "$cpu" "$SRCS_PER_THREAD"
	for ((k = 0; k < SRCS_PER_THREAD; k++)); do
		dev=${PG_THREAD_DEVS[k]}
		pg_base_config "$dev" "$per_dev_count" "$delay"
		pg_set "$dev" "clone_skb $CLONE_SKB"
		if ((IPV6)); then
			pg_set "$dev" "src6 $(pg_src6 $((i * SRCS_PER_THREAD + k)))"
		else
			# Every thread draws from the whole range.
			pg_set "$dev" "src_min $(pg_int_to_ip4 "$PG_SRC_MIN")"
			pg_set "$dev" "src_max $(pg_int_to_ip4 "$PG_SRC_MAX")"
			pg_set "$dev" "flag IPSRC_RND"
		fi
		pg_set "$dev" "udp_src_min $SRC_PORT_MIN"
		pg_set "$dev" "udp_src_max $SRC_PORT_MAX"
		pg_set "$dev" "flag UDPSRC_RND"
	done
done

pg_run
pg_report
