#!/usr/bin/env bash
# A local N-node MeshHealth network on loopback, for trying things out.
#
#   deploy/cluster.sh [--tls] [--broker URL] [--base-port P] N [DIR]   start N nodes
#   deploy/cluster.sh stop [DIR]                                      stop them
#   deploy/cluster.sh status [DIR]                                    which still run
#
# DIR (default ./cluster) gets one directory per node (node-1 ... node-N),
# made with `meshhealth init` and `meshhealth network create`, a shared
# genesis.toml, and cluster.pids: one line "PID NAME URL" per node started.
# `stop` signals exactly those PIDs (SIGTERM: each node commits what it
# batched), and only while each still runs its own `node run --config`.
# Starting an existing DIR again reuses its keys, network and data.
#
#   --tls          issue a CA and node certificates with deploy/certs.sh
#                  (DIR/pki): the API and gossip serve HTTPS/WSS, peers check
#                  each other against the CA (and talk to the nodes with
#                  SSL_CERT_FILE=DIR/pki/ca.crt meshhealth ...)
#   --broker URL   every node ingests from this MQTT broker (a shared
#                  subscription); default: an embedded broker per node.  With
#                  --tls and an mqtts:// URL, each node's certificate is also
#                  its MQTT client certificate: issue the CA and the broker's
#                  certificate first (deploy/certs.sh -d DIR/pki ca; ... broker
#                  127.0.0.1) and start Mosquitto on them (deploy/mosquitto)
#   --base-port P  node i listens on P+i-1 (API) and P+100+i-1 (embedded
#                  broker); default: free ports
#
# $PYTHON picks the interpreter that has meshhealth installed (default python3).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python3}"

die() {
    echo "cluster.sh: $*" >&2
    exit 2
}

usage() {
    awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}" >&"${2:-2}"
    exit "$1"
}

mh() {
    "$PY" -m meshhealth.cli.main "$@"
}

# alive PID CONFIG: true while PID runs `node run --config CONFIG` (a recycled
# PID running something else is left alone)
alive() {
    local cmdline
    [ -r "/proc/$1/cmdline" ] || return 1
    cmdline="$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null)" || return 1
    [[ "$cmdline" == *"node run --config $2"* ]]
}

# wait_api URL CA LOG PID: until the node answers /v1/status (or exits, or 60 s)
wait_api() {
    "$PY" - "$1" "$2" "$4" <<'EOF'
import os, ssl, sys, time, urllib.request
url, ca, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
ctx = ssl.create_default_context(cafile=ca) if ca else None
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(1)
    try:
        with urllib.request.urlopen(f"{url}/v1/status", timeout=2, context=ctx):
            sys.exit(0)
    except OSError:
        time.sleep(0.2)
sys.exit(1)
EOF
}

cmd_stop() {
    local dir="$1" pids="$1/cluster.pids" pid name url cfg left=()
    [ -f "$pids" ] || die "no $pids: nothing was started in $dir"
    while read -r pid name url; do
        cfg="$dir/$name/node.toml"
        if alive "$pid" "$cfg"; then
            kill -TERM "$pid"
            left+=("$pid:$name")
        else
            echo "$name (pid $pid) is not running"
        fi
    done <"$pids"
    local deadline=$((SECONDS + 30)) entry
    for entry in "${left[@]+"${left[@]}"}"; do
        pid="${entry%%:*}"
        name="${entry#*:}"
        while alive "$pid" "$dir/$name/node.toml" && [ "$SECONDS" -lt "$deadline" ]; do
            sleep 0.2
        done
        if alive "$pid" "$dir/$name/node.toml"; then
            kill -KILL "$pid"
            echo "$name (pid $pid) did not stop in 30 s: killed"
        else
            echo "$name (pid $pid) stopped"
        fi
    done
    rm -f "$pids"
}

cmd_status() {
    local dir="$1" pid name url
    [ -f "$dir/cluster.pids" ] || die "no $dir/cluster.pids: nothing was started in $dir"
    while read -r pid name url; do
        if alive "$pid" "$dir/$name/node.toml"; then
            echo "$name  pid $pid  $url  running"
        else
            echo "$name  pid $pid  $url  stopped"
        fi
    done <"$dir/cluster.pids"
}

# configure DIR N TLS BROKER BASE: point every node.toml at the network, its peers, its ports
configure() {
    "$PY" - "$@" <<'EOF'
import sys
from dataclasses import replace
from pathlib import Path

from meshhealth.cli.netutil import free_port
from meshhealth.config import NodeConfig

root, n, tls, broker, base = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4], int(sys.argv[5])
scheme = "https" if tls else "http"
api = [base + i if base else free_port() for i in range(n)]
mqtt = [base + 100 + i if base else free_port() for i in range(n)]
for i in range(n):
    d = root / f"node-{i + 1}"
    cfg = NodeConfig.load(d / "node.toml")
    cfg = replace(
        cfg,
        genesis_file="../genesis.toml",
        api=replace(cfg.api, host="127.0.0.1", port=api[i]),
        mqtt=replace(
            cfg.mqtt,
            broker=broker,
            embedded_port=mqtt[i],
            shared_group="cluster" if broker else "",
            # an mqtts:// broker of the same CA: the node certificate is also its MQTT one
            ca_file="../pki/ca.crt" if tls and broker.startswith("mqtts://") else "",
            cert_file=f"../pki/nodes/node-{i + 1}.crt" if tls and broker.startswith("mqtts://") else "",
            key_file=f"../pki/nodes/node-{i + 1}.key" if tls and broker.startswith("mqtts://") else "",
        ),
        ingest=replace(cfg.ingest, verify_workers=1),
        gossip=replace(cfg.gossip, peers=[f"{scheme}://127.0.0.1:{p}" for j, p in enumerate(api) if j != i]),
        tls=replace(
            cfg.tls,
            cert_file=f"../pki/nodes/node-{i + 1}.crt" if tls else "",
            key_file=f"../pki/nodes/node-{i + 1}.key" if tls else "",
            ca_file="../pki/ca.crt" if tls else "",
        ),
    )
    (d / "node.toml").write_text(cfg.dumps())
    NodeConfig.load(d / "node.toml")  # what we wrote must load
EOF
}

cmd_start() {
    local n="$1" dir="$2" tls="$3" broker="$4" base="$5" i existing
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "N must be a positive number of nodes, not $n"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    if [ -f "$dir/cluster.pids" ]; then
        local pid name url
        while read -r pid name url; do
            alive "$pid" "$dir/$name/node.toml" && die "$name (pid $pid) still runs; first: $0 stop $dir"
        done <"$dir/cluster.pids"
        rm -f "$dir/cluster.pids"
    fi
    existing=0
    [ -f "$dir/genesis.toml" ] && existing=1
    if [ "$existing" -eq 1 ]; then
        local have
        have="$(find "$dir" -maxdepth 1 -type d -name 'node-*' | wc -l)"
        [ "$have" -eq "$n" ] || die "$dir holds a $have-node network, not $n; pick another DIR"
        [ "$tls" -eq 0 ] || [ -f "$dir/pki/ca.crt" ] || die "$dir was made without --tls; pick another DIR"
        [ -f "$dir/pki/ca.crt" ] && tls=1 # made with --tls: it stays TLS
        echo "reusing the network in $dir"
    else
        # empty, or holding only a pki/ made first (for a broker of the same CA)
        [ -z "$(ls -A "$dir" | grep -vx pki)" ] || die "$dir is not empty and holds no cluster; pick another DIR"
        local auths=()
        for i in $(seq 1 "$n"); do
            mh init "$dir/node-$i" --name "node-$i" --genesis "$dir/genesis.toml" >/dev/null
            auths+=(--authority "node-$i=$dir/node-$i/node.key")
        done
        mh network create --name "cluster-$(basename "$dir")" "${auths[@]}" --out "$dir/genesis.toml"
        if [ "$tls" -eq 1 ]; then
            bash "$HERE/certs.sh" -d "$dir/pki" ca >/dev/null
            for i in $(seq 1 "$n"); do
                bash "$HERE/certs.sh" -d "$dir/pki" node "node-$i" 127.0.0.1 localhost >/dev/null
            done
        fi
    fi
    configure "$dir" "$n" "$tls" "$broker" "$base"

    local ca="" scheme=http pid url cfg
    if [ "$tls" -eq 1 ]; then
        ca="$dir/pki/ca.crt"
        scheme=https
    fi
    : >"$dir/cluster.pids"
    for i in $(seq 1 "$n"); do
        cfg="$dir/node-$i/node.toml"
        nohup "$PY" -m meshhealth.cli.main --log-level INFO node run --config "$cfg" \
            >>"$dir/node-$i/node.log" 2>&1 </dev/null &
        pid=$!
        url="$scheme://127.0.0.1:$(sed -n 's/^port = \([0-9]*\)$/\1/p' "$cfg" | head -n 1)"
        echo "$pid node-$i $url" >>"$dir/cluster.pids"
    done
    local failed=0
    while read -r pid name url; do
        if wait_api "$url" "$ca" "$dir/$name/node.log" "$pid"; then
            echo "$name  pid $pid  $url"
        else
            echo "$name did not come up; its log ($dir/$name/node.log) ends:" >&2
            tail -n 15 "$dir/$name/node.log" >&2 || true
            failed=1
        fi
    done <"$dir/cluster.pids"
    if [ "$failed" -eq 1 ]; then
        cmd_stop "$dir" >&2
        exit 1
    fi
    local nodes=""
    while read -r pid name url; do nodes+=" --node $url"; done <"$dir/cluster.pids"
    echo "pids in $dir/cluster.pids; stop with: $0 stop $dir"
    echo "status: ${ca:+SSL_CERT_FILE=$ca }meshhealth network status$nodes"
}

[ $# -ge 1 ] || usage 2
case "$1" in
    -h | --help | help) usage 0 1 ;;
    stop)
        [ $# -le 2 ] || die "usage: cluster.sh stop [DIR]"
        cmd_stop "${2:-./cluster}"
        ;;
    status)
        [ $# -le 2 ] || die "usage: cluster.sh status [DIR]"
        cmd_status "${2:-./cluster}"
        ;;
    *)
        TLS=0
        BROKER=""
        BASE=0
        while [ $# -gt 0 ]; do
            case "$1" in
                --tls) TLS=1 ;;
                --broker)
                    [ $# -ge 2 ] || die "--broker needs a URL"
                    BROKER="$2"
                    shift
                    ;;
                --base-port)
                    [ $# -ge 2 ] && [[ "$2" =~ ^[0-9]+$ ]] || die "--base-port needs a port number"
                    BASE="$2"
                    shift
                    ;;
                -*) die "unknown option $1 (see $0 --help)" ;;
                *) break ;;
            esac
            shift
        done
        [ $# -ge 1 ] && [ $# -le 2 ] || usage 2
        cmd_start "$1" "${2:-./cluster}" "$TLS" "$BROKER" "$BASE"
        ;;
esac
