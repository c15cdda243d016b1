# shellcheck shell=bash
# shellcheck disable=SC2034 # globals set here (PG_SRC_MIN, SRC ...) are read by the scenario scripts
#
# lib.sh: helpers shared by the xdplb pktgen scenarios (single-flow.sh, many-sources.sh,
# spoofed-flood.sh) and results.sh. Sourced, never run.
#
# The kernel's packet generator is driven by writing one command per write to files under
# /proc/net/pktgen:
#   pgctrl          "reset" (drop every device from every thread), "start" (blocks until
#                   every thread is done or a signal arrives), "stop"
#   kpktgend_<cpu>  the generator thread bound to that CPU: "rem_device_all",
#                   "add_device <iface>@<tag>" (one packet stream on <iface>)
#   <iface>@<tag>   that stream's settings: count, pkt_size, dst, dst_mac, src_min, flag ...;
#                   after a run it also holds the "Result:" lines read by pg_results.
#
# Dry run (DRY_RUN=1 in the environment, or -n): every write is printed on stdout as
# "<file>: <command>" and nothing about the host is checked or touched (no root, no module, no
# device needed). That output is what tests/tests/pktgen_scripts.rs compares. Messages go to
# stderr, so stdout carries nothing but the writes.

readonly PG_PROC=/proc/net/pktgen
PG_PROG=${0##*/}
# Default thread cap: more generator threads than this rarely help a single NIC.
readonly PG_MAX_THREADS=16

# Set by the scenario script before pg_parse_args.
PG_ABOUT=${PG_ABOUT:-}
PG_SCENARIO_HELP=${PG_SCENARIO_HELP:-}
PG_TAKES_K=${PG_TAKES_K:-0}
PG_DEFAULT_K=${PG_DEFAULT_K:-16}

# Devices (pktgen streams) configured so far, for pg_report.
PG_DEVICES=()
# The devices pg_setup_thread added to the current thread.
PG_THREAD_DEVS=()

# --- messages -------------------------------------------------------------------------------

pg_err() { printf '%s: error: %s\n' "$PG_PROG" "$*" >&2; }
pg_warn() { printf '%s: warning: %s\n' "$PG_PROG" "$*" >&2; }
pg_info() { printf '%s: %s\n' "$PG_PROG" "$*" >&2; }
pg_die() {
	pg_err "$*"
	exit 1
}
# A bad command line: exit 2, like getopts-style tools.
pg_usage_error() {
	pg_err "$*"
	printf "Try '%s -h' for the options.\n" "$PG_PROG" >&2
	exit 2
}

pg_dry_run() { [[ -n ${DRY_RUN:-} && ${DRY_RUN} != 0 ]]; }

# --- value checks ---------------------------------------------------------------------------

# pg_uint OPT VALUE MIN MAX WHAT: VALUE must be a decimal whole number in MIN..MAX.
pg_uint() {
	local opt=$1 v=$2 min=$3 max=$4 what=$5
	if [[ ! $v =~ ^[0-9]{1,18}$ ]] || ((10#$v < min || 10#$v > max)); then
		pg_usage_error "$opt: $what must be a whole number from $min to $max (got '$v')"
	fi
}

# pg_ip4_to_int ADDR: prints the dotted quad as an integer; status 1 if it is not one.
pg_ip4_to_int() {
	local a=$1 o1 o2 o3 o4 o
	[[ $a =~ ^([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})$ ]] || return 1
	o1=$((10#${BASH_REMATCH[1]})) o2=$((10#${BASH_REMATCH[2]}))
	o3=$((10#${BASH_REMATCH[3]})) o4=$((10#${BASH_REMATCH[4]}))
	for o in "$o1" "$o2" "$o3" "$o4"; do
		((o <= 255)) || return 1
	done
	printf '%d\n' $(((o1 << 24) | (o2 << 16) | (o3 << 8) | o4))
}

# pg_int_to_ip4 N: the dotted quad of N.
pg_int_to_ip4() {
	local n=$1
	printf '%d.%d.%d.%d\n' $(((n >> 24) & 255)) $(((n >> 16) & 255)) $(((n >> 8) & 255)) $((n & 255))
}

# pg_ip6_groups ADDR: prints the eight 16-bit groups of an IPv6 address as decimal numbers
# separated by spaces; status 1 if ADDR is not a plain IPv6 address (no zone, no dotted tail).
pg_ip6_groups() {
	local a=$1 head tail g i
	local -a h=() t=() out=()
	[[ $a =~ ^[0-9A-Fa-f:]{2,39}$ ]] || return 1
	# A leading or trailing single colon is an empty group.
	[[ $a != :* || $a == ::* ]] || return 1
	[[ $a != *: || $a == *:: ]] || return 1
	if [[ $a == *::* ]]; then
		head=${a%%::*} tail=${a#*::}
		[[ $tail != *::* ]] || return 1
		[[ -z $head ]] || IFS=: read -r -a h <<<"$head"
		[[ -z $tail ]] || IFS=: read -r -a t <<<"$tail"
		((${#h[@]} + ${#t[@]} <= 7)) || return 1
	else
		IFS=: read -r -a h <<<"$a"
		((${#h[@]} == 8)) || return 1
	fi
	for g in ${h[@]+"${h[@]}"}; do
		[[ $g =~ ^[0-9A-Fa-f]{1,4}$ ]] || return 1
		out+=("$((16#$g))")
	done
	for ((i = ${#h[@]} + ${#t[@]}; i < 8; i++)); do
		out+=(0)
	done
	for g in ${t[@]+"${t[@]}"}; do
		[[ $g =~ ^[0-9A-Fa-f]{1,4}$ ]] || return 1
		out+=("$((16#$g))")
	done
	printf '%s\n' "${out[*]}"
}

# pg_ip4_range OPT SPEC: parses "A-B" or "A/LEN" into PG_SRC_MIN and PG_SRC_MAX (integers,
# inclusive).
pg_ip4_range() {
	local opt=$1 spec=$2 lo hi len
	if [[ $spec =~ ^([0-9.]+)-([0-9.]+)$ ]]; then
		lo=$(pg_ip4_to_int "${BASH_REMATCH[1]}") || pg_usage_error "$opt: '${BASH_REMATCH[1]}' is not an IPv4 address"
		hi=$(pg_ip4_to_int "${BASH_REMATCH[2]}") || pg_usage_error "$opt: '${BASH_REMATCH[2]}' is not an IPv4 address"
	elif [[ $spec =~ ^([0-9.]+)/([0-9]{1,2})$ ]]; then
		lo=$(pg_ip4_to_int "${BASH_REMATCH[1]}") || pg_usage_error "$opt: '${BASH_REMATCH[1]}' is not an IPv4 address"
		len=$((10#${BASH_REMATCH[2]}))
		((len >= 8 && len <= 32)) || pg_usage_error "$opt: prefix length must be 8 to 32 (got /$len)"
		lo=$((lo & ~((1 << (32 - len)) - 1) & 0xffffffff))
		hi=$((lo + (1 << (32 - len)) - 1))
	else
		pg_usage_error "$opt: give an IPv4 range as FIRST-LAST or ADDRESS/LEN (got '$spec')"
	fi
	((lo <= hi)) || pg_usage_error "$opt: the range's first address is above its last ('$spec')"
	PG_SRC_MIN=$lo PG_SRC_MAX=$hi
}

# pg_ip6_prefix48 OPT SPEC: parses an IPv6 /48 ("2001:2::/48") into PG_SRC6_PREFIX, its first
# three groups as "g0:g1:g2" in hex. Sources are then <g0:g1:g2>:<n>::1, one per /64 (see
# pg_src6).
pg_ip6_prefix48() {
	local opt=$1 spec=$2 groups
	local -a g
	[[ $spec == */48 ]] || pg_usage_error "$opt: with -6 give a /48 prefix, e.g. 2001:2::/48 (got '$spec'); source n is <prefix>:<n>::1, one per /64"
	groups=$(pg_ip6_groups "${spec%/48}") || pg_usage_error "$opt: '${spec%/48}' is not an IPv6 address"
	read -r -a g <<<"$groups"
	((g[3] == 0 && g[4] == 0 && g[5] == 0 && g[6] == 0 && g[7] == 0)) ||
		pg_usage_error "$opt: '$spec' has bits set beyond /48"
	PG_SRC6_PREFIX=$(printf '%x:%x:%x' "${g[0]}" "${g[1]}" "${g[2]}")
}

# pg_src6 N: IPv6 source number N of PG_SRC6_PREFIX. N lands in bits 48-63, so every source is
# in its own /64: the rate limiter keys IPv6 sources by prefix (64 bits unless a policy says
# otherwise), and sources differing only in their low 64 bits would share one bucket.
pg_src6() {
	printf '%s:%x::1\n' "$PG_SRC6_PREFIX" "$1"
}

# --- command line ---------------------------------------------------------------------------

pg_usage() {
	cat <<EOF
Usage: $PG_PROG -i DEV -d VIP -m MAC -p PORT [options]

$PG_ABOUT

Required:
  -i DEV     egress interface of this (generator) host
  -d VIP     destination address: the service's VIP (IPv4; IPv6 with -6)
  -m MAC     destination MAC: the next hop towards the VIP (the load balancer node's
             interface; on a VPC the subnet router): ip route get VIP, then
             ip neigh show <its gateway, or the VIP> dev DEV
  -p PORT    destination UDP port: the VIP's service port (1-65535)
Options:
  -6         IPv6: -d (and -S) are IPv6 addresses
  -s SIZE    frame size on the wire including the 4-byte FCS (default 64; with -6 82, the
             smallest IPv6 frame pktgen builds); pktgen's pkt_size is SIZE-4
  -t N       threads, one per CPU and TX queue (default: online CPUs from -f, at most
             $PG_MAX_THREADS and at most the device's TX queues)
  -f CPU     first CPU: threads run on CPUs CPU .. CPU+N-1 (default 0)
  -c COUNT   packets per thread (default 10000000; 0 = until -D runs out or Ctrl-C)
  -D SECS    stop after SECS seconds (COUNT then defaults to 0)
  -b BURST   packets handed to the driver per transmit call (pktgen burst; default 1)
$PG_SCENARIO_HELP
  -n         dry run: print each /proc/net/pktgen write as "<file>: <command>" instead of
             writing it, and skip the host checks (same as DRY_RUN=1)
  -h         this help
EOF
}

# pg_parse_args "$@": sets DEV DST DST_MAC UDP_DST FRAME_SIZE PKT_SIZE THREADS FIRST_CPU COUNT
# DURATION BURST IPV6 SRC SRCS_PER_THREAD (and DRY_RUN with -n), all checked except SRC, whose
# meaning is the scenario's.
pg_parse_args() {
	DEV="" DST="" DST_MAC="" UDP_DST="" FRAME_SIZE="" THREADS="" FIRST_CPU=0 COUNT=""
	DURATION=0 BURST=1 IPV6=0 SRC="" SRCS_PER_THREAD=""
	local opt
	OPTIND=1
	while getopts ':i:d:m:p:s:t:f:c:D:b:S:k:6nh' opt; do
		case $opt in
		i) DEV=$OPTARG ;;
		d) DST=$OPTARG ;;
		m) DST_MAC=$OPTARG ;;
		p) UDP_DST=$OPTARG ;;
		s) FRAME_SIZE=$OPTARG ;;
		t) THREADS=$OPTARG ;;
		f) FIRST_CPU=$OPTARG ;;
		c) COUNT=$OPTARG ;;
		D) DURATION=$OPTARG ;;
		b) BURST=$OPTARG ;;
		S) SRC=$OPTARG ;;
		k) SRCS_PER_THREAD=$OPTARG ;;
		6) IPV6=1 ;;
		n) DRY_RUN=1 ;;
		h)
			pg_usage
			exit 0
			;;
		:) pg_usage_error "-$OPTARG needs a value" ;;
		*) pg_usage_error "unknown option -$OPTARG" ;;
		esac
	done
	shift $((OPTIND - 1))
	(($# == 0)) || pg_usage_error "unexpected argument '$1'"
	pg_check_args
}

pg_check_args() {
	[[ -n $DEV ]] || pg_usage_error "missing -i DEV: the generator's egress interface"
	[[ $DEV =~ ^[A-Za-z0-9_.-]{1,15}$ ]] || pg_usage_error "-i: '$DEV' is not an interface name"

	[[ -n $DST ]] || pg_usage_error "missing -d VIP: the destination (service VIP) address"
	if ((IPV6)); then
		pg_ip6_groups "$DST" >/dev/null || pg_usage_error "-d: '$DST' is not an IPv6 address"
	elif [[ $DST == *:* ]]; then
		pg_usage_error "-d: '$DST' is an IPv6 address: add -6"
	else
		pg_ip4_to_int "$DST" >/dev/null || pg_usage_error "-d: '$DST' is not an IPv4 address"
	fi

	[[ -n $DST_MAC ]] || pg_usage_error "missing -m MAC: the next hop's (load balancer node's) MAC; see 'ip neigh'"
	[[ $DST_MAC =~ ^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$ ]] ||
		pg_usage_error "-m: '$DST_MAC' is not a MAC address (xx:xx:xx:xx:xx:xx)"

	[[ -n $UDP_DST ]] || pg_usage_error "missing -p PORT: the VIP's UDP service port"
	pg_uint -p "$UDP_DST" 1 65535 "the UDP port"
	UDP_DST=$((10#$UDP_DST))

	local min_size=64 what="the frame size"
	if ((IPV6)); then
		min_size=82
		what="the IPv6 frame size (14 Ethernet + 40 IPv6 + 8 UDP + 16 pktgen header + 4 FCS at least)"
	fi
	FRAME_SIZE=${FRAME_SIZE:-$min_size}
	pg_uint -s "$FRAME_SIZE" "$min_size" 9216 "$what"
	FRAME_SIZE=$((10#$FRAME_SIZE))
	# pktgen's pkt_size counts the frame without the FCS the NIC appends.
	PKT_SIZE=$((FRAME_SIZE - 4))

	pg_uint -f "$FIRST_CPU" 0 8191 "the first CPU"
	FIRST_CPU=$((10#$FIRST_CPU))
	if [[ -z $THREADS ]]; then
		THREADS=$(pg_default_threads)
	else
		pg_uint -t "$THREADS" 1 1024 "the thread count"
		THREADS=$((10#$THREADS))
	fi

	pg_uint -D "$DURATION" 0 604800 "the duration in seconds"
	DURATION=$((10#$DURATION))
	if [[ -z $COUNT ]]; then
		if ((DURATION > 0)); then COUNT=0; else COUNT=10000000; fi
	else
		pg_uint -c "$COUNT" 0 999999999999 "the packet count per thread"
		COUNT=$((10#$COUNT))
	fi

	pg_uint -b "$BURST" 1 1024 "the burst"
	BURST=$((10#$BURST))

	if [[ -n $SRCS_PER_THREAD ]]; then
		((PG_TAKES_K)) || pg_usage_error "-k: $PG_PROG sends from one source; -k is for many-sources.sh and spoofed-flood.sh"
		((IPV6)) || pg_usage_error "-k: only with -6 (IPv4 sources come from the -S range)"
		pg_uint -k "$SRCS_PER_THREAD" 1 1024 "the IPv6 sources per thread"
		SRCS_PER_THREAD=$((10#$SRCS_PER_THREAD))
	elif ((IPV6 && PG_TAKES_K)); then
		SRCS_PER_THREAD=$PG_DEFAULT_K
	else
		SRCS_PER_THREAD=1
	fi
}

# Online CPUs from FIRST_CPU, at most PG_MAX_THREADS and at most the device's TX queues (one
# queue per thread: QUEUE_MAP_CPU sends thread N's packets on queue N mod queues).
pg_default_threads() {
	local n txq
	n=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
	n=$((n - FIRST_CPU))
	((n <= PG_MAX_THREADS)) || n=$PG_MAX_THREADS
	if [[ -d /sys/class/net/$DEV/queues ]]; then
		txq=$(find "/sys/class/net/$DEV/queues" -maxdepth 1 -name 'tx-*' | wc -l)
		((txq < 1 || n <= txq)) || n=$txq
	fi
	((n >= 1)) || n=1
	printf '%d\n' "$n"
}

# --- host checks ----------------------------------------------------------------------------

# Without dry run: the device exists, we are root, pktgen is loaded (modprobe if need be) and
# has a thread on every CPU we will use.
pg_preflight() {
	local i cpu
	if pg_dry_run; then
		pg_info "dry run: printing the writes to $PG_PROC, not making them"
		return 0
	fi
	[[ -e /sys/class/net/$DEV ]] || pg_die "-i: no such network device '$DEV' on this host"
	[[ $EUID -eq 0 ]] || pg_die "must run as root: pktgen is driven by writing to $PG_PROC (try sudo, or -n for a dry run)"
	if [[ ! -e $PG_PROC/pgctrl ]]; then
		modprobe pktgen 2>/dev/null || true
	fi
	[[ -e $PG_PROC/pgctrl ]] ||
		pg_die "no $PG_PROC/pgctrl: 'modprobe pktgen' failed; this kernel lacks pktgen (CONFIG_NET_PKTGEN)"
	for ((i = 0; i < THREADS; i++)); do
		cpu=$((FIRST_CPU + i))
		[[ -e $PG_PROC/kpktgend_$cpu ]] ||
			pg_die "-t/-f: no pktgen thread for CPU $cpu ($PG_PROC/kpktgend_$cpu); online CPUs: $(cat /sys/devices/system/cpu/online 2>/dev/null || echo '?')"
	done
	[[ $(cat "/sys/class/net/$DEV/operstate" 2>/dev/null || echo unknown) != down ]] ||
		pg_warn "$DEV is down: pktgen stops a device without carrier at once"
}

# --- /proc/net/pktgen writers ---------------------------------------------------------------

# pg_write FILE COMMAND...: one write of COMMAND to /proc/net/pktgen/FILE. Dry run: print it.
# A thread or device file reports each write's outcome on its "Result:" line: anything but
# "OK" (an unknown flag, say, is reported there, not by the write failing) stops the script.
# pgctrl has no result line: a failed write returns 1 for the caller to judge.
pg_write() {
	local file=$1
	shift
	local cmd="$*" path="$PG_PROC/$file" result
	if pg_dry_run; then
		printf '%s: %s\n' "$path" "$cmd"
		return 0
	fi
	if ! { printf '%s\n' "$cmd" >"$path"; } 2>/dev/null; then
		[[ $file == pgctrl ]] && return 1
		result=$(grep -m1 '^Result:' "$path" 2>/dev/null || true)
		pg_die "writing '$cmd' to $path failed${result:+: $result}"
	fi
	[[ $file == pgctrl ]] && return 0
	result=$(grep -m1 '^Result:' "$path" 2>/dev/null || true)
	[[ $result == "Result: OK"* ]] || pg_die "'$cmd' to $path: ${result:-no Result line}"
}

pg_ctrl() { pg_write pgctrl "$@"; }
pg_thread() {
	local cpu=$1
	shift
	pg_write "kpktgend_$cpu" "$@"
}
pg_set() {
	local dev=$1
	shift
	pg_write "$dev" "$@"
}

# pg_setup_thread CPU N: empties CPU's thread and gives it N devices (packet streams) on DEV,
# named DEV@CPU (N = 1) or DEV@CPU-0 .. DEV@CPU-<N-1>; their names go to PG_THREAD_DEVS.
pg_setup_thread() {
	local cpu=$1 n=$2 k name
	PG_THREAD_DEVS=()
	pg_thread "$cpu" rem_device_all
	for ((k = 0; k < n; k++)); do
		if ((n == 1)); then name="$DEV@$cpu"; else name="$DEV@$cpu-$k"; fi
		pg_thread "$cpu" "add_device $name"
		PG_THREAD_DEVS+=("$name")
		PG_DEVICES+=("$name")
	done
}

# pg_base_config NAME COUNT DELAY: the settings every scenario shares: the destination (VIP,
# port, next-hop MAC), size, count, burst, and flags:
#   QUEUE_MAP_CPU  thread N transmits on TX queue N (no lock contention between threads)
#   NO_TIMESTAMP   skip pktgen's per-packet timestamp (the receiver doesn't read it)
#   UDPCSUM        real UDP checksums (required by IPv6; for IPv4 it makes the load balancer
#                  update a checksum, as it must for real traffic)
pg_base_config() {
	local dev=$1 count=$2 delay=$3
	pg_set "$dev" "flag QUEUE_MAP_CPU"
	pg_set "$dev" "flag NO_TIMESTAMP"
	pg_set "$dev" "flag UDPCSUM"
	pg_set "$dev" "count $count"
	pg_set "$dev" "pkt_size $PKT_SIZE"
	pg_set "$dev" "burst $BURST"
	pg_set "$dev" "delay $delay"
	if ((IPV6)); then
		pg_set "$dev" "dst6 $DST"
	else
		pg_set "$dev" "dst $DST"
	fi
	pg_set "$dev" "dst_mac $DST_MAC"
	pg_set "$dev" "udp_dst_min $UDP_DST"
	pg_set "$dev" "udp_dst_max $UDP_DST"
}

# pg_per_device_count N: the count for each of a thread's N devices so the thread sends COUNT
# (rounded up; 0 stays 0 = no limit).
pg_per_device_count() {
	local n=$1
	printf '%d\n' $(((COUNT + n - 1) / n))
}

# --- run and results ------------------------------------------------------------------------

# pg_run: start every thread and wait; with -D, stop them after DURATION seconds.
pg_run() {
	local starter waited
	if pg_dry_run; then
		pg_ctrl start
		((DURATION == 0)) || pg_ctrl stop
		return 0
	fi
	if ((DURATION > 0)); then
		pg_info "running ${DURATION}s on $THREADS thread(s) (Ctrl-C stops early)"
		# Writing "start" returns when every thread has stopped: write it in the background,
		# then "stop" after the duration.
		pg_ctrl start &
		starter=$!
		trap 'pg_info "interrupted: stopping"' INT
		# Sleep in steps, so a run whose -c count finishes first ends the wait too.
		waited=0
		while ((waited < DURATION)) && kill -0 "$starter" 2>/dev/null; do
			sleep 1 || break
			waited=$((waited + 1))
		done
		trap - INT
		pg_ctrl stop || pg_warn "writing 'stop' to $PG_PROC/pgctrl failed"
		wait "$starter" || true
	else
		if ((COUNT == 0)); then
			pg_info "running on $THREADS thread(s) until Ctrl-C"
		else
			pg_info "sending $COUNT packets on each of $THREADS thread(s) (Ctrl-C stops early)"
		fi
		# Ctrl-C interrupts the blocked write; pktgen then stops every thread, and we go on to
		# print the results.
		trap 'pg_info "interrupted: stopping"' INT
		pg_ctrl start || true
		trap - INT
	fi
}

# pg_report: the results of the devices this run configured (nothing in dry run).
pg_report() {
	local name
	local -a files=()
	pg_dry_run && return 0
	for name in "${PG_DEVICES[@]}"; do
		files+=("$PG_PROC/$name")
	done
	pg_results "${files[@]}"
}

# pg_results FILE...: reads pktgen device dumps (a /proc/net/pktgen/<dev> file, or several
# such dumps saved one after another in one file) and prints, per thread and in total: packets,
# seconds, pps, Mb/s as pktgen counts it (frames without FCS), wire Mb/s (adding FCS, preamble
# and inter-frame gap: 24 bytes a frame) and transmit errors. A thread's devices are DEV@CPU or
# DEV@CPU-K. Status 1 if no file holds a finished run's result.
#
# A finished device's result reads (pktgen's show_results):
#   Result: OK: 3398154(c3397933+d221) usec, 10000000 (60byte,0frags)
#     2942774pps 1412Mb/sec (1412531520bps) errors: 0
pg_results() {
	(($# > 0)) || {
		pg_err "pg_results: no files"
		return 1
	}
	local f
	for f in "$@"; do
		[[ -r $f ]] || {
			pg_err "cannot read '$f'"
			return 1
		}
	done
	awk '
	function flush_pending() {
		if (pending) { noresult[name] = "result cut short"; pending = 0 }
	}
	function thread_of(dev,    at, tag) {
		at = index(dev, "@")
		if (at == 0) return dev
		tag = substr(dev, at + 1)
		sub(/-[0-9]+$/, "", tag)
		return substr(dev, 1, at) tag
	}
	FNR == 1 {
		if (NR > 1 && !sawresult) printf "pktgen results: %s has no Result line\n", file > "/dev/stderr"
		file = FILENAME
		sawresult = 0
	}
	FNR == 1 || /^Params:/ { flush_pending(); name = ""; anon++ }
	/^Result:/ { sawresult = 1 }
	/ifname:/ {
		for (i = 1; i < NF; i++) if ($i == "ifname:") name = $(i + 1)
	}
	/^Result: OK: [0-9]+\(c[0-9]+\+d[0-9]+\) usec, [0-9]+ \([0-9]+byte,/ {
		if (name == "") name = "device" anon
		usec = $3 + 0
		pkts = $5 + 0
		b = $6
		gsub(/[^0-9,]/, "", b)
		split(b, parts, ",")
		bytes = parts[1] + 0
		pending = 1
		next
	}
	pending && /pps .*Mb\/sec/ {
		pps = $1 + 0
		mbps = $2 + 0
		errs = $NF + 0
		t = thread_of(name)
		if (!(t in devs)) order[++nthreads] = t
		devs[t]++
		tpkts[t] += pkts
		tpps[t] += pps
		tmbps[t] += mbps
		twire[t] += pps * (bytes + 24) * 8 / 1000000
		terrs[t] += errs
		if (usec > tusec[t]) tusec[t] = usec
		done[name] = 1
		pending = 0
		next
	}
	/^Result:/ {
		flush_pending()
		if (name == "") name = "device" anon
		r = $0
		sub(/^Result: */, "", r)
		if (!(name in done)) noresult[name] = r
	}
	END {
		flush_pending()
		if (NR > 0 && !sawresult) printf "pktgen results: %s has no Result line\n", file > "/dev/stderr"
		for (n in noresult)
			if (!(n in done))
				printf "pktgen results: %s has no finished run (Result: %s)\n", n, noresult[n] > "/dev/stderr"
		if (nthreads == 0) {
			print "pktgen results: no finished run found" > "/dev/stderr"
			exit 1
		}
		fmt = "%-18s %7s %14s %9s %12s %9s %10s %10s\n"
		printf fmt, "thread", "devices", "packets", "seconds", "pps", "Mb/s", "wire_Mb/s", "errors"
		for (i = 1; i <= nthreads; i++) {
			t = order[i]
			printf fmt, t, devs[t], sprintf("%.0f", tpkts[t]), sprintf("%.3f", tusec[t] / 1000000), \
				sprintf("%.0f", tpps[t]), sprintf("%.0f", tmbps[t]), sprintf("%.0f", twire[t]), \
				sprintf("%.0f", terrs[t])
			ndev += devs[t]; spkts += tpkts[t]; spps += tpps[t]; smbps += tmbps[t]
			swire += twire[t]; serrs += terrs[t]
			if (tusec[t] > susec) susec = tusec[t]
		}
		printf fmt, "total", ndev, sprintf("%.0f", spkts), sprintf("%.3f", susec / 1000000), \
			sprintf("%.0f", spps), sprintf("%.0f", smbps), sprintf("%.0f", swire), sprintf("%.0f", serrs)
		printf "total: %.2f Mpps, %.2f Gb/s (%.2f Gb/s on the wire), %.0f transmit errors\n", \
			spps / 1000000, smbps / 1000, swire / 1000, serrs
	}
	' "$@"
}
