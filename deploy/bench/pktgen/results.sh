#!/usr/bin/env bash
#
# results.sh [FILE...]: per-thread and total pps and Mb/s of a pktgen run, read from pktgen
# device files. Without arguments it reads every device in /proc/net/pktgen (the scenarios
# print the same table themselves at the end of a run). FILE may also be a saved copy, or
# several device files saved one after another in one file, e.g.
#
#   for f in /proc/net/pktgen/*@*; do cat "$f"; done > run1.txt
#   ./results.sh run1.txt
#
# PKTGEN_RESULTS=FILE (a colon-separated list is fine too) is read when no argument is given.
set -euo pipefail

PG_HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$PG_HERE/lib.sh"

case ${1:-} in
-h | --help)
	sed -n '3,11s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
	exit 0
	;;
esac

files=("$@")
if ((${#files[@]} == 0)) && [[ -n ${PKTGEN_RESULTS:-} ]]; then
	IFS=: read -r -a files <<<"$PKTGEN_RESULTS"
fi
if ((${#files[@]} == 0)); then
	[[ -d $PG_PROC ]] || pg_die "no $PG_PROC (pktgen not loaded) and no FILE given"
	for f in "$PG_PROC"/*; do
		case ${f##*/} in
		pgctrl | kpktgend_*) ;;
		*) files+=("$f") ;;
		esac
	done
	((${#files[@]} > 0)) || pg_die "no pktgen devices in $PG_PROC"
fi

pg_results "${files[@]}"
