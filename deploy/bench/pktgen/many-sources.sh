#!/usr/bin/env bash
#
# many-sources.sh: many UDP flows from many sources to VIP:PORT, like real client traffic and
# the benchmark's fair comparison. IPv4: the -S range (default 198.18.0.0-198.18.15.255, 4096
# sources in the RFC 2544 benchmarking block) is split between the threads, each walking its
# slice one address per new packet buffer, from a random source port each time. The load
# balancer sees thousands of sources and ever new flows spread over every RX queue: flow-table
# inserts, Maglev lookups and one rate-limiter entry per source.
#
# IPv6: pktgen cannot vary an IPv6 source (only the destination), so each thread runs -k
# streams (pktgen devices), each with its own fixed source, one per /64 of the -S /48 (default
# 2001:2::/48, the RFC 5180 benchmarking block), cycling between them. That gives threads x k
# sources (16 per thread by default); every pktgen device takes ~1.5 MiB of kernel memory, so
# e.g. 8 threads x -k 128 = 1024 sources costs ~1.5 GiB.
#
#   sudo ./many-sources.sh -i ens5 -d 10.0.100.10 -m 0a:1b:2c:3d:4e:5f -p 8080 -D 30
#
# See README.md for the two-host setup and how to read the results; -h for the options.
set -euo pipefail

PG_HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$PG_HERE/lib.sh"

PG_ABOUT="Many flows from many sources to VIP:PORT: source addresses from a range, split
between the threads, random source ports."
PG_SCENARIO_HELP="  -S RANGE   IPv4 sources: FIRST-LAST or ADDRESS/LEN (default 198.18.0.0-198.18.15.255,
             4096 sources); with -6 a /48 (default 2001:2::/48): source n is <prefix>:<n>::1
  -k N       with -6: sources (pktgen devices) per thread (default 16; ~1.5 MiB kernel
             memory each)"
PG_TAKES_K=1
PG_DEFAULT_K=16

DEFAULT_SRC4=198.18.0.0-198.18.15.255
DEFAULT_SRC6=2001:2::/48
# Each packet buffer (one source address, one random source port) is sent this many times
# before the next is built: the flows change every few packets while pktgen keeps most of its
# clone_skb speed.
CLONE_SKB=16
# Source ports are drawn at random from this range (pktgen excludes the upper bound).
SRC_PORT_MIN=1024
SRC_PORT_MAX=65535

pg_parse_args "$@"

if ((IPV6)); then
	pg_ip6_prefix48 -S "${SRC:-$DEFAULT_SRC6}"
	sources=$((THREADS * SRCS_PER_THREAD))
	((sources <= 65536)) || pg_usage_error "-k: $THREADS threads x $SRCS_PER_THREAD sources exceeds the /48's 65536 /64s"
	pg_info "$sources IPv6 sources ($PG_SRC6_PREFIX:<n>::1, one per /64): $SRCS_PER_THREAD per thread, ~$((sources * 3 / 2)) MiB of pktgen device memory"
else
	pg_ip4_range -S "${SRC:-$DEFAULT_SRC4}"
	sources=$((PG_SRC_MAX - PG_SRC_MIN + 1))
	((sources >= THREADS)) || pg_usage_error "-S: $sources sources are fewer than the $THREADS threads"
	((sources >= 1000)) || pg_warn "-S: only $sources sources; the benchmark's comparison uses at least 1000"
	pg_info "$sources IPv4 sources $(pg_int_to_ip4 "$PG_SRC_MIN")-$(pg_int_to_ip4 "$PG_SRC_MAX"), split between $THREADS threads"
fi

pg_preflight

# Several devices on one thread: pktgen's thread sends from whichever device is due first, and
# with delay 0 that is always the same one. delay 1 (ns) makes every packet push its device's
# due time on by 1 ns, so the devices take turns, without slowing anything down (the due times
# stay in the past).
delay=0
((SRCS_PER_THREAD == 1)) || delay=1
per_dev_count=$(pg_per_device_count "$SRCS_PER_THREAD")
slice=$((sources / THREADS))

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
			# Thread i walks its own slice; the last thread also takes the remainder.
			lo=$((PG_SRC_MIN + i * slice))
			hi=$((lo + slice - 1))
			((i < THREADS - 1)) || hi=$PG_SRC_MAX
			pg_set "$dev" "src_min $(pg_int_to_ip4 "$lo")"
			pg_set "$dev" "src_max $(pg_int_to_ip4 "$hi")"
		fi
		pg_set "$dev" "udp_src_min $SRC_PORT_MIN"
		pg_set "$dev" "udp_src_max $SRC_PORT_MAX"
		pg_set "$dev" "flag UDPSRC_RND"
	done
done

pg_run
pg_report
