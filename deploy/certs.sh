#!/usr/bin/env bash
# Issue the certificates of a MeshHealth site with openssl alone.
#
#   deploy/certs.sh [-d DIR] [-f] COMMAND [ARGS...]
#
# One directory (default ./pki, or $MESHHEALTH_PKI) holds a small CA and
# everything it issued.  Every command is idempotent: what exists is kept
# (and said so) unless -f asks to issue it again.  Private keys are written
# with mode 0600.  Keys are ECDSA P-256; leaf certificates last 825 days.
#
#   ca                        the CA: ca.key, ca.crt (first, once)
#   broker HOST...            broker.crt/.key for Mosquitto; SANs = the HOSTs
#   node NAME HOST...         nodes/NAME.crt/.key, CN mh-node-NAME: the node's MQTT
#                             client certificate AND its HTTPS (API, gossip) server
#                             certificate; SANs = the HOSTs the node is dialed at
#   device ID|KEYFILE...      devices/<id>.crt/.key, CN = the device id (64 hex), read
#                             from a `meshhealth device keygen` file or given as hex
#   gateway NAME [DEVICE...]  gateways/NAME.crt/.key, CN mh-gw-NAME, for one MQTT
#                             connection serving several devices: it may publish for
#                             the DEVICEs listed (ids or key files), or for any device
#                             when none is listed (a trusted gateway)
#   acl                       rewrite the managed part of DIR/meshhealth.acl
#
# DIR also gets meshhealth.acl (from deploy/mosquitto/meshhealth.acl, its
# node and gateway part rewritten by `node`, `gateway` and `acl`) and an
# empty passwd (for Mosquitto's optional username/password listener), so
# DIR is exactly what deploy/mosquitto/mosquitto.conf calls
# /etc/mosquitto/meshhealth (copy ca.key elsewhere first: the broker does
# not need it).  After changing the ACL, send Mosquitto a SIGHUP.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ACL_TEMPLATE="$HERE/mosquitto/meshhealth.acl"
BEGIN_MARK="# >>> managed by deploy/certs.sh: nodes and gateways (edits here are overwritten)"
END_MARK="# <<< end of the managed part"
DAYS_CA=3650
DAYS_LEAF=825

usage() {
    if [ "${1:-2}" -eq 0 ]; then
        awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"
    else
        awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}" >&2
    fi
    exit "${1:-2}"
}

die() {
    echo "certs.sh: $*" >&2
    exit 2
}

DIR="${MESHHEALTH_PKI:-./pki}"
FORCE=0
while getopts ":d:fh" opt; do
    case "$opt" in
        d) DIR="$OPTARG" ;;
        f) FORCE=1 ;;
        h) usage 0 ;;
        :) die "-$OPTARG needs a value" ;;
        *) die "unknown option -$OPTARG (see deploy/certs.sh -h)" ;;
    esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || usage 2
CMD="$1"
shift

command -v openssl >/dev/null 2>&1 || die "openssl is not installed (apt-get install openssl)"
umask 077 # every key and temporary file is private; certificates are made 0644 below
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# --- helpers ------------------------------------------------------------------

need_ca() {
    [ -s "$DIR/ca.crt" ] && [ -s "$DIR/ca.key" ] || die "no CA in $DIR; run: deploy/certs.sh -d $DIR ca"
}

# exists PATH: true (and says so) when PATH is there and -f was not given
exists() {
    if [ -s "$1" ] && [ "$FORCE" -eq 0 ]; then
        echo "kept    $1 (exists; -f issues it again)"
        return 0
    fi
    return 1
}

# san_list HOST...: "DNS:a,IP:1.2.3.4,..."
san_list() {
    local out="" h
    for h in "$@"; do
        if [[ "$h" =~ ^[0-9]+(\.[0-9]+){3}$ || "$h" == *:* ]]; then
            out+="${out:+,}IP:$h"
        else
            out+="${out:+,}DNS:$h"
        fi
    done
    printf '%s' "$out"
}

# device_id ID|KEYFILE: the 64-hex device id
device_id() {
    local arg="$1" id
    if [[ "$arg" =~ ^[0-9a-fA-F]{64}$ ]]; then
        printf '%s' "${arg,,}"
        return
    fi
    [ -f "$arg" ] || die "$arg is neither a 64-hex device id nor a key file (meshhealth device keygen --out FILE)"
    id="$(sed -n 's/^public = "\([0-9a-f]\{64\}\)"$/\1/p' "$arg" | head -n 1)"
    [ -n "$id" ] || die "$arg has no public = \"<64 hex>\" line; is it a meshhealth key file?"
    printf '%s' "$id"
}

# issue OUT_BASE CN EKU [SAN]: OUT_BASE.key (new) and OUT_BASE.crt signed by the CA
issue() {
    local base="$1" cn="$2" eku="$3" san="${4:-}" ext
    need_ca
    mkdir -p "$(dirname "$base")"
    ext="$WORK/ext.cnf"
    {
        echo "basicConstraints = critical, CA:FALSE"
        echo "keyUsage = critical, digitalSignature, keyEncipherment"
        echo "extendedKeyUsage = $eku"
        echo "subjectKeyIdentifier = hash"
        echo "authorityKeyIdentifier = keyid, issuer"
        [ -z "$san" ] || echo "subjectAltName = $san"
    } >"$ext"
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$base.key.new" -out "$base.csr" -subj "/CN=$cn" 2>/dev/null
    openssl x509 -req -in "$base.csr" -CA "$DIR/ca.crt" -CAkey "$DIR/ca.key" \
        -set_serial "0x$(openssl rand -hex 16)" -days "$DAYS_LEAF" -sha256 \
        -extfile "$ext" -out "$base.crt.new" 2>/dev/null
    rm -f "$base.csr"
    chmod 0600 "$base.key.new"
    chmod 0644 "$base.crt.new"
    mv -f "$base.key.new" "$base.key"
    mv -f "$base.crt.new" "$base.crt"
    echo "issued  $base.crt  CN=$cn${san:+  $san}"
}

ensure_acl() {
    if [ ! -f "$DIR/meshhealth.acl" ]; then
        cp "$ACL_TEMPLATE" "$DIR/meshhealth.acl"
        chmod 0644 "$DIR/meshhealth.acl"
    fi
    grep -qxF "$BEGIN_MARK" "$DIR/meshhealth.acl" && grep -qxF "$END_MARK" "$DIR/meshhealth.acl" ||
        die "$DIR/meshhealth.acl lacks the managed-part markers; copy $ACL_TEMPLATE over it"
    [ -e "$DIR/passwd" ] || { : >"$DIR/passwd"; }
}

# the managed part of the ACL, from the certificates in DIR
acl_block() {
    local crt name dev
    for crt in "$DIR"/nodes/*.crt; do
        [ -e "$crt" ] || continue
        name="$(basename "$crt" .crt)"
        echo ""
        echo "user mh-node-$name"
        echo "topic deny mh/v1/readings/mh-node-$name"
        echo "topic read mh/v1/readings/+"
        echo "topic read \$share/+/mh/v1/readings/+"
        echo "topic write mh/v1/receipts/+"
    done
    for crt in "$DIR"/gateways/*.crt; do
        [ -e "$crt" ] || continue
        name="$(basename "$crt" .crt)"
        echo ""
        echo "user mh-gw-$name"
        echo "topic deny mh/v1/readings/mh-gw-$name"
        if [ -s "$DIR/gateways/$name.devices" ]; then
            while read -r dev; do
                echo "topic write mh/v1/readings/$dev"
                echo "topic read mh/v1/receipts/$dev"
            done <"$DIR/gateways/$name.devices"
        else
            echo "topic write mh/v1/readings/+"
            echo "topic read mh/v1/receipts/+"
        fi
    done
}

write_acl() {
    ensure_acl
    local acl="$DIR/meshhealth.acl" tmp block
    tmp="$(mktemp "$DIR/.acl.XXXXXX")"
    block="$WORK/acl-block"
    acl_block >"$block"
    echo "" >>"$block"
    # keep everything outside the markers; replace what is between them
    awk -v b="$BEGIN_MARK" -v e="$END_MARK" -v blk="$block" '
        $0 == b { print; while ((getline line < blk) > 0) print line; skip = 1; next }
        $0 == e { skip = 0 }
        !skip { print }
    ' "$acl" >"$tmp"
    chmod 0644 "$tmp"
    if cmp -s "$tmp" "$acl"; then
        rm -f "$tmp"
        echo "kept    $acl (unchanged)"
    else
        mv -f "$tmp" "$acl"
        echo "wrote   $acl (reload Mosquitto: kill -HUP its pid)"
    fi
}

# --- commands -----------------------------------------------------------------

mkdir -p "$DIR"
case "$CMD" in
    ca)
        [ $# -eq 0 ] || die "usage: certs.sh [-d DIR] ca"
        if ! exists "$DIR/ca.crt"; then
            openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
                -keyout "$DIR/ca.key" -out "$DIR/ca.crt" -days "$DAYS_CA" -sha256 \
                -subj "/CN=MeshHealth CA $(date -u +%Y-%m-%d) $(openssl rand -hex 4)" \
                -addext "basicConstraints = critical, CA:TRUE, pathlen:0" \
                -addext "keyUsage = critical, keyCertSign, cRLSign" 2>/dev/null
            chmod 0600 "$DIR/ca.key"
            chmod 0644 "$DIR/ca.crt"
            echo "issued  $DIR/ca.crt (keep $DIR/ca.key offline)"
        fi
        ensure_acl
        ;;
    broker)
        [ $# -ge 1 ] || die "usage: certs.sh [-d DIR] broker HOST... (the names devices dial)"
        exists "$DIR/broker.crt" || issue "$DIR/broker" "$1" serverAuth "$(san_list "$@")"
        ;;
    node)
        [ $# -ge 2 ] || die "usage: certs.sh [-d DIR] node NAME HOST... (the names peers dial)"
        name="$1"
        shift
        [[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] || die "node name $name: use letters, digits, . _ -"
        exists "$DIR/nodes/$name.crt" ||
            issue "$DIR/nodes/$name" "mh-node-$name" "serverAuth, clientAuth" "$(san_list "$@")"
        write_acl
        ;;
    device)
        [ $# -ge 1 ] || die "usage: certs.sh [-d DIR] device ID|KEYFILE..."
        for arg in "$@"; do
            id="$(device_id "$arg")"
            exists "$DIR/devices/$id.crt" || issue "$DIR/devices/$id" "$id" clientAuth
        done
        ;;
    gateway)
        [ $# -ge 1 ] || die "usage: certs.sh [-d DIR] gateway NAME [DEVICE...]"
        name="$1"
        shift
        [[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] || die "gateway name $name: use letters, digits, . _ -"
        list="$WORK/devices"
        : >"$list"
        for arg in "$@"; do # every device first: a bad one changes nothing
            id="$(device_id "$arg")"
            echo "$id" >>"$list"
        done
        exists "$DIR/gateways/$name.crt" || issue "$DIR/gateways/$name" "mh-gw-$name" clientAuth
        chmod 0644 "$list"
        mv -f "$list" "$DIR/gateways/$name.devices"
        write_acl
        ;;
    acl)
        [ $# -eq 0 ] || die "usage: certs.sh [-d DIR] acl"
        write_acl
        ;;
    help | -h | --help) usage 0 ;;
    *) die "unknown command $CMD (ca, broker, node, device, gateway, acl; see -h)" ;;
esac
