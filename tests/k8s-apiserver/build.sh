#!/usr/bin/env bash
# Builds xdplb's test Kubernetes API server (main.go and its siblings, on k8s.io/apiserver) and
# provides an etcd binary, from Debian packages pinned in packages.lock. See README.md.
#
#   tests/k8s-apiserver/build.sh          build (or reuse) and print, as the last two lines:
#                                           APISERVER=/abs/path
#                                           ETCD=/abs/path
#   tests/k8s-apiserver/build.sh relock   re-resolve the packages from today's sid/trixie, build
#                                          from them and rewrite packages.lock (then re-test!)
#
# Idempotent: everything lives in ${XDPLB_CACHE:-$HOME/.cache/xdplb}/k8s and work already done is
# skipped (a run with everything cached only hashes a few files). Safe to run concurrently (flock).
# Installs nothing into the system: apt runs with a private configuration, state and cache under
# the cache directory, and only downloads (.debs are unpacked with dpkg-deb -x). Network: only the
# Debian mirror the machine's apt already uses (override with XDPLB_DEBIAN_MIRROR).
# Everything but the two result lines goes to stderr.
set -euo pipefail
export LC_ALL=C

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LOCKFILE=$HERE/packages.lock
CACHE=${XDPLB_CACHE:-$HOME/.cache/xdplb}/k8s
KUBE_VERSION=1.36.4 # what the server reports at /version: the k8s.io/* library version
GO_VERSION=1.27     # the golang-X.Y-go package in packages.lock
# Relock roots: the Go packages that the server and openapi-gen import come from these and their
# golang-*-dev dependencies.
RELOCK_ROOTS="golang-k8s-apiserver-dev golang-k8s-api-dev golang-k8s-apimachinery-dev
  golang-k8s-component-base-dev golang-k8s-kube-openapi-dev golang-k8s-client-go-dev
  golang-$GO_VERSION-go golang-$GO_VERSION-src"
RELOCK_ETCD_SUITE=trixie

log() { printf '[k8s-apiserver build] %s\n' "$*" >&2; }
die() { printf '[k8s-apiserver build] error: %s\n' "$*" >&2; exit 1; }
set -E
trap 'die "line $LINENO failed (exit $?): $BASH_COMMAND"' ERR
now() { date +%s; }

mkdir -p "$CACHE"
exec 9>"$CACHE/.build.lock"
if ! flock -w 1800 9; then die "timed out waiting for another build.sh holding $CACHE/.build.lock"; fi

BIN=$CACHE/bin
APISERVER=$BIN/xdplb-test-apiserver
ETCD=$BIN/etcd
TREE=$CACHE/tree
GOPATH_DIR=$CACHE/gopath

# --- fast path: nothing changed since the last successful build --------------------------------
source_hash() {
  (cd "$HERE" && cat packages.lock build.sh ./*.go) | sha256sum | cut -d' ' -f1
}
HASH=$(source_hash)
if [[ "${1:-}" != relock && -x $APISERVER && -x $ETCD && -f $CACHE/build.stamp && $(cat "$CACHE/build.stamp") == "$HASH" ]]; then
  echo "APISERVER=$APISERVER"
  echo "ETCD=$ETCD"
  exit 0
fi

# --- private apt ---------------------------------------------------------------------------------
host_mirror() {
  # The first non-security Debian URI in the host's apt sources (one-line or deb822 format).
  # Runs in a $(...) subshell: missing files or no match are not errors here.
  trap - ERR
  set +e +o pipefail
  {
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
      sed -e 's/#.*//' -e 's/\[[^]]*\]//' | awk '$1 == "deb" && $3 !~ /security/ { print $2 }'
    for f in /etc/apt/sources.list.d/*.sources; do
      [[ -f $f ]] || continue
      awk 'BEGIN { RS = ""; FS = "\n" }
        { uris = ""; suites = ""; types = ""
          for (i = 1; i <= NF; i++) {
            if ($i ~ /^URIs:/) { uris = $i; sub(/^URIs:[ \t]*/, "", uris) }
            if ($i ~ /^Suites:/) { suites = $i }
            if ($i ~ /^Types:/) { types = $i }
          }
          if (types ~ /deb( |$)/ && suites !~ /security/ && uris != "") { split(uris, u, /[ \t]+/); print u[1] } }' "$f"
    done
  } | grep -E '^https?://[^ ]*/debian/?$' | head -n1 | sed 's:/*$::'
}

setup_apt() {
  local mirror=${XDPLB_DEBIAN_MIRROR:-$(host_mirror)}
  mirror=${mirror:-http://deb.debian.org/debian}
  local keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  [[ -f $keyring ]] || die "$keyring is missing (package debian-archive-keyring)"
  local A=$CACHE/apt
  mkdir -p "$A/etc/apt.conf.d" "$A/etc/preferences.d" "$A/etc/sources.list.d" "$A/etc/trusted.gpg.d" \
    "$A/state/lists/partial" "$A/cache/archives/partial"
  touch "$A/state/status" "$A/etc/main.conf"
  cat >"$A/etc/sources.list" <<EOF
deb [signed-by=$keyring] $mirror sid main
deb [signed-by=$keyring] $mirror trixie main
EOF
  {
    echo "Dir::Etc::main \"$A/etc/main.conf\";"
    echo "Dir::Etc::parts \"$A/etc/apt.conf.d\";"
    echo "Dir::Etc::sourcelist \"$A/etc/sources.list\";"
    echo "Dir::Etc::sourceparts \"$A/etc/sources.list.d\";"
    echo "Dir::Etc::preferences \"$A/etc/preferences\";"
    echo "Dir::Etc::preferencesparts \"$A/etc/preferences.d\";"
    echo "Dir::Etc::trustedparts \"$A/etc/trusted.gpg.d\";"
    echo "Dir::State \"$A/state\";"
    echo "Dir::State::status \"$A/state/status\";"
    echo "Dir::Cache \"$A/cache\";"
    echo "APT::Architecture \"amd64\";"
    echo "APT::Architectures { \"amd64\"; };"
    echo "Acquire::Languages \"none\";"
    echo "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled \"false\";"
    echo "Acquire::Check-Valid-Until \"false\";"
    echo "APT::Sandbox::User \"$(id -un)\";"
    # Carry over the host's proxy settings, if any, so we reach the mirror the way apt does.
    apt-config dump 2>/dev/null | grep -iE '^Acquire::(http|https)::Proxy' || true
  } >"$A/apt.conf"
  export APT_CONFIG=$A/apt.conf
  MIRROR=$mirror
}

apt_update() {
  log "apt-get update (private lists: sid + trixie from $MIRROR)"
  apt-get -q update >&2 || die "apt-get update from $MIRROR failed"
  touch "$CACHE/apt/updated"
}

# deb_file NAME VERSION -> path of the downloaded .deb (may not exist)
deb_file() {
  local name=$1 ver=${2//:/%3a}
  compgen -G "$CACHE/debs/${name}_${ver}_*.deb" | head -n1 || true
}

lock_entries() { grep -vE '^\s*(#|$)' "$1"; }

fetch_debs() { # fetch_debs LOCKFILE
  local lock=$1 missing=() name ver
  mkdir -p "$CACHE/debs"
  while read -r name ver; do
    [[ -n $(deb_file "$name" "$ver") ]] || missing+=("$name=$ver")
  done < <(lock_entries "$lock")
  ((${#missing[@]} == 0)) && return 0
  log "downloading ${#missing[@]} pinned .debs"
  setup_apt
  [[ -f $CACHE/apt/updated ]] || apt_update
  if ! (cd "$CACHE/debs" && apt-get -q download "${missing[@]}" >&2); then
    apt_update # the lists may be older than the pins
    if ! (cd "$CACHE/debs" && apt-get -q download "${missing[@]}" >&2); then
      local gone=()
      for pv in "${missing[@]}"; do
        apt-cache madison "${pv%%=*}" 2>/dev/null |
          awk -F'|' -v v="${pv#*=}" '{ gsub(/ /, "", $2) } $2 == v { found = 1 } END { exit !found }' ||
          gone+=("$pv")
      done
      if ((${#gone[@]})); then
        die "pinned Debian package version(s) no longer on $MIRROR (sid/trixie): ${gone[*]//=/ }
  Debian sid moves on. Run '$HERE/build.sh relock' to pin what the mirror has now, then re-run the
  API-server tests; or point XDPLB_DEBIAN_MIRROR at a mirror/snapshot that still has them."
      fi
      die "apt-get download failed for: ${missing[*]}"
    fi
  fi
  # The package lists (~250 MB) are only needed to download: drop them.
  rm -rf "$CACHE/apt/state/lists" "$CACHE/apt/cache" "$CACHE/apt/updated"
}

extract_tree() { # extract_tree LOCKFILE DEST
  local lock=$1 dest=$2 name ver f
  rm -rf "$dest.new"
  mkdir -p "$dest.new"
  while read -r name ver; do
    f=$(deb_file "$name" "$ver")
    [[ -n $f ]] || die "internal: $name $ver not downloaded"
    dpkg-deb -x "$f" "$dest.new"
  done < <(lock_entries "$lock")
  rm -rf "$dest"
  mv "$dest.new" "$dest"
}

go_env() { # go_env TREE
  export GOROOT=$1/usr/lib/go-$GO_VERSION
  export PATH=$GOROOT/bin:$PATH
  export GOPATH=$GOPATH_DIR:$1/usr/share/gocode
  export GO111MODULE=off GOPROXY=off GOTOOLCHAIN=local GOENV=off GOTELEMETRY=off GOWORK=off
  export GOFLAGS=-buildvcs=false CGO_ENABLED=0
  export GOCACHE=$CACHE/gocache
  [[ -x $GOROOT/bin/go ]] || die "no Go toolchain at $GOROOT"
}

# The Go packages whose types the server serves; openapi-gen makes their OpenAPI definitions.
OPENAPI_PKGS="k8s.io/api/core/v1 k8s.io/api/discovery/v1 k8s.io/api/apps/v1 k8s.io/api/rbac/v1
  k8s.io/api/events/v1 k8s.io/api/coordination/v1 k8s.io/apimachinery/pkg/apis/meta/v1
  k8s.io/apimachinery/pkg/runtime k8s.io/apimachinery/pkg/util/intstr
  k8s.io/apimachinery/pkg/api/resource k8s.io/apimachinery/pkg/version"

# gen_openapi TREE -> $GOPATH_DIR/src/xdplbopenapi/zz_generated.openapi.go (skipped if up to date)
gen_openapi() {
  local tree=$1 dir=$GOPATH_DIR/src/xdplbopenapi key
  key=$(printf '%s\n' "$tree" "$(cat "$tree/.stamp" 2>/dev/null || true)" "$OPENAPI_PKGS" | sha256sum | cut -d' ' -f1)
  if [[ -x $BIN/openapi-gen && -f $dir/zz_generated.openapi.go && $(cat "$dir/.stamp" 2>/dev/null) == "$key" ]]; then
    return 0
  fi
  log "building openapi-gen"
  go build -o "$BIN/openapi-gen" k8s.io/kube-openapi/cmd/openapi-gen
  log "generating OpenAPI definitions"
  printf '// Code generated by openapi-gen (tests/k8s-apiserver/build.sh). DO NOT EDIT.\n' >"$CACHE/openapi-header.txt"
  mkdir -p "$dir"
  rm -f "$dir"/*.go "$dir/.stamp"
  # shellcheck disable=SC2086
  "$BIN/openapi-gen" --output-dir "$dir" --output-pkg xdplbopenapi \
    --output-file zz_generated.openapi.go --go-header-file "$CACHE/openapi-header.txt" \
    --report-filename "$CACHE/openapi-api-violations.txt" $OPENAPI_PKGS >&2
  echo "$key" >"$dir/.stamp"
}

# build_all TREE -> bin/xdplb-test-apiserver, bin/openapi-gen, bin/etcd
build_all() {
  local tree=$1 t0 src=$GOPATH_DIR/src/xdplb-test-apiserver v=k8s.io/component-base/version
  t0=$(now)
  go_env "$tree"
  mkdir -p "$BIN" "$src"
  gen_openapi "$tree"
  log "building the API server"
  rm -f "$src"/*.go
  cp "$HERE"/*.go "$src/"
  (cd "$src" && go build -o "$APISERVER.new" -ldflags "-X $v.gitVersion=v$KUBE_VERSION \
    -X $v.gitMajor=${KUBE_VERSION%%.*} -X $v.gitMinor=$(echo "$KUBE_VERSION" | cut -d. -f2) -X $v.gitTreeState=clean" .)
  mv "$APISERVER.new" "$APISERVER"
  [[ -x $tree/usr/bin/etcd ]] || die "no etcd in the extracted etcd-server package"
  cp "$tree/usr/bin/etcd" "$ETCD.new" && mv "$ETCD.new" "$ETCD"
  "$ETCD" --version >/dev/null || die "$ETCD does not run on this machine"
  log "built in $(($(now) - t0)) s"
}

# --- relock: re-resolve from today's mirror -------------------------------------------------------
relock() {
  setup_apt
  apt_update
  local work=$CACHE/relock
  rm -rf "$work"
  mkdir -p "$work"
  # Every golang-* package reachable from the roots (Go library sources are arch-all .debs of
  # source; nothing else is needed to build). apt-cache prints candidates, i.e. sid's versions.
  # shellcheck disable=SC2086
  apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
    --no-replaces --no-enhances $RELOCK_ROOTS | grep -E '^golang-' | sort -u >"$work/names"
  local etcd_ver
  etcd_ver=$(apt-cache madison etcd-server | awk -v s="$RELOCK_ETCD_SUITE/" '$0 ~ s { print $3; exit }')
  [[ -n $etcd_ver ]] || die "etcd-server not found in $RELOCK_ETCD_SUITE"
  {
    while read -r name; do
      printf '%s %s\n' "$name" "$(apt-cache policy "$name" | awk '/Candidate:/ { print $2 }')"
    done <"$work/names"
    echo "etcd-server $etcd_ver"
  } >"$work/full.lock"
  log "relock: $(wc -l <"$work/full.lock") candidate packages; downloading"
  fetch_debs "$work/full.lock"
  extract_tree "$work/full.lock" "$work/tree"
  build_all "$work/tree"

  # Keep only the packages that own a file the two programs compile (or a symlink on the way).
  log "relock: finding the packages actually used"
  local name ver f
  while read -r name ver; do
    f=$(deb_file "$name" "$ver")
    dpkg-deb -c "$f" | awk -v p="$name $ver" '{ path = $6; sub(/^\./, "", path); sub(/\/$/, "", path); print path "\t" p }'
  done < <(lock_entries "$work/full.lock") | sort -t$'\t' -k1,1 >"$work/owners"
  go_env "$work/tree"
  (cd "$GOPATH_DIR/src/xdplb-test-apiserver" &&
    go list -deps -f '{{if not .Standard}}{{$d := .Dir}}{{range .GoFiles}}{{$d}}/{{.}}{{"\n"}}{{end}}{{range .EmbedFiles}}{{$d}}/{{.}}{{"\n"}}{{end}}{{end}}' \
      . k8s.io/kube-openapi/cmd/openapi-gen) | grep "^$work/tree/" | sed "s|^$work/tree||" >"$work/files"
  # Paths to look up: each file, and each symlink among its parent directories.
  {
    cat "$work/files"
    sed 's|/[^/]*$||' "$work/files" | sort -u | while read -r d; do
      local p=""
      IFS=/ read -ra parts <<<"${d#/}"
      for c in "${parts[@]}"; do
        p="$p/$c"
        if [[ -L $work/tree$p ]]; then echo "$p"; fi
      done
    done
    # Files reached through a symlinked directory: look up their real location too.
    while read -r f; do
      local real
      real=$(readlink -f "$work/tree$f")
      echo "${real#"$work/tree"}"
    done <"$work/files"
  } | sort -u >"$work/paths"
  join -t$'\t' "$work/paths" "$work/owners" | cut -f2 | sort -u >"$work/used"
  {
    grep -E "^(golang-$GO_VERSION-go|golang-$GO_VERSION-src|etcd-server) " "$work/full.lock"
    cat "$work/used"
  } | sort -u >"$work/pinned"
  log "relock: $(wc -l <"$work/pinned") packages used; verifying a clean build from just those"
  rm -rf "$CACHE/gocache" # prove that the pinned set alone builds
  extract_tree "$work/pinned" "$work/tree-pinned"
  build_all "$work/tree-pinned"
  {
    echo "# Debian packages the xdplb test API server is built from, one 'name version' a line."
    echo "# build.sh fetches exactly these (apt-get download name=version) from the machine's Debian mirror,"
    echo "# suites sid (Go toolchain and Go library sources) and trixie (etcd-server)."
    echo "# Regenerate with 'build.sh relock' when sid has moved on and a version has vanished from the mirror."
    cat "$work/pinned"
  } >"$LOCKFILE"
  rm -rf "$work" "$TREE" "$CACHE/build.stamp"
  log "relock: wrote $LOCKFILE; now run build.sh again and the API-server tests"
}

if [[ "${1:-}" == relock ]]; then
  relock
  exit 0
fi
[[ $# -eq 0 ]] || die "usage: $0 [relock]"

# --- normal build ----------------------------------------------------------------------------------
T0=$(now)
LOCK_HASH=$(sha256sum <"$LOCKFILE" | cut -d' ' -f1)
if [[ ! -f $TREE/.stamp || $(cat "$TREE/.stamp") != "$LOCK_HASH" ]]; then
  fetch_debs "$LOCKFILE"
  log "unpacking $(lock_entries "$LOCKFILE" | wc -l) .debs into $TREE"
  extract_tree "$LOCKFILE" "$TREE"
  echo "$LOCK_HASH" >"$TREE/.stamp"
  # Drop .debs that the lock no longer names.
  declare -A wanted=()
  while read -r name ver; do wanted[$(deb_file "$name" "$ver")]=1; done < <(lock_entries "$LOCKFILE")
  for f in "$CACHE/debs"/*.deb; do
    [[ -e $f && -z ${wanted[$f]:-} ]] && rm -f "$f"
  done
fi
build_all "$TREE"
echo "$HASH" >"$CACHE/build.stamp"
log "done in $(($(now) - T0)) s; cache: $(du -sh "$CACHE" 2>/dev/null | cut -f1) in $CACHE"
echo "APISERVER=$APISERVER"
echo "ETCD=$ETCD"
