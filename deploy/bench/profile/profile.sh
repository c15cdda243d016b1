#!/bin/bash
# Where a BPF program of the data path spends its time, per source line, while the per-packet
# bench holds one scenario (XDPLB_BENCH_HOLD). Root; installs perf and bpftool with apt-get if
# they are missing; needs a built bench (cargo xtask bench builds target/release/bench).
#
#   deploy/bench/profile/profile.sh [SCENARIO] [PROGRAM] [FUNCTION]
#     SCENARIO  a per-packet scenario's short name (default: established; see the report)
#     PROGRAM   the loaded program whose samples are attributed (default: lb_uplink)
#     FUNCTION  PROGRAM itself (default) or one of its subprograms, e.g. lb_new_flow new_flow
#
# Prints the kernel's symbols by share of the measuring CPU's samples (the flow table's hash
# and bucket walk show up as kernel functions), then the program's source lines by share of
# its own samples: the sampled addresses mapped through the program's BTF line info.
set -euo pipefail
scenario=${1:-established}
prog=${2:-lb_uplink}
func=${3:-$prog}
root=$(cd "$(dirname "$0")/../../.." && pwd)
bench=$root/target/release/bench
cpu=$(($(nproc) - 1)) # the bench measures on the last CPU by default
work=$(mktemp -d)
log=$work/bench.log
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT

for tool in perf bpftool; do
    command -v "$tool" >/dev/null || apt-get install -y -q linux-perf bpftool >/dev/null ||
        { echo "$tool is missing and apt-get could not install it" >&2; exit 1; }
done
[ -x "$bench" ] || { echo "no $bench: run cargo xtask bench (or cargo build --release -p lb-tests --bin bench)" >&2; exit 1; }
XDPLB_BENCH_HOLD=$scenario timeout 300 "$bench" --quick --only perpacket --no-katran \
    --out "$work/results" >"$log" 2>&1 &
for _ in $(seq 1 240); do
    grep -q "holding" "$log" && break
    sleep 0.5
done
grep -q "holding" "$log" || { echo "the bench never held '$scenario':" >&2; tail -5 "$log" >&2; exit 1; }
# The held scenario runs for 8 s; sample 5 of them.
perf record -q -C "$cpu" -F 20000 -o "$work/perf.data" -- sleep 5 >/dev/null 2>&1
# The bench may hold more than one copy of the program, and aya's macro makes the program a
# stub calling a subprogram of the same name: follow the symbol with the most samples.
perf script -i "$work/perf.data" -F ip,sym,symoff 2>/dev/null |
    awk -v f="$func" '$2 ~ "^bpf_prog_[0-9a-f]+_" f "\\+0x" { print $2 }' >"$work/samples"
sym=$(sed 's/+0x.*//' "$work/samples" | sort | uniq -c | sort -rn | awk '{ print $2; exit }')
[ -n "$sym" ] || { echo "no samples in $func" >&2; exit 1; }
grep "^$sym+0x" "$work/samples" | sed 's/.*+0x//' | sort | uniq -c | awk '{ print $2, $1 }' >"$work/offsets"
echo "== kernel symbols, share of CPU $cpu's samples"
perf report -i "$work/perf.data" --sort sym --stdio 2>/dev/null >"$work/report"
grep -v -e '^#' -e '^$' "$work/report" | head -16
echo "== $func's source lines, share of its own samples"
python3 "$(dirname "$0")/lines.py" "$prog" "$sym" "$work/offsets" 40
