#!/bin/sh
# Local images for a machine that reaches package registries but no image registry: a Debian 12 base with Python
# 3.11 (mmdebstrap + docker import), a wheels image of requirements.txt (pip wheel on this host, so pip's own
# configuration picks torch: the CPU wheel where that is what it installs), and an nginx >= 1.27.3 image for the
# replicas (Debian unstable's). Idempotent: an image that exists is kept (--rebuild makes them again). Prints the
# variables and the compose command to use. Needs: a running Docker engine, mmdebstrap, pip.
#
#   sh docker/local_images.sh [--rebuild]
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
REQS_TAG=$(sha256sum "$ROOT/requirements.txt" | cut -c1-12)   # new requirements -> a new wheels image
BASE=gpt-local-base:bookworm
WHEELS=gpt-local-wheels:$REQS_TAG
NGINX=gpt-local-nginx:sid
REBUILD=0
LOG=$(mktemp "${TMPDIR:-/tmp}/gpt-local-images.XXXXXX.log")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpt-local-images.XXXXXX")
# the log and the work folder go on every exit, a failure's too (a failed step shows its output first)
trap 'rm -rf "$WORK" "$LOG"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() { echo "error: $*" >&2; exit 2; }

for arg in "$@"; do
    case $arg in
        --rebuild) REBUILD=1 ;;
        -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) fail "unknown argument $arg (usage: sh docker/local_images.sh [--rebuild])" ;;
    esac
done

command -v docker >/dev/null || fail "docker is not installed (Debian: apt-get install docker.io; docs/docker.md)"
docker info >/dev/null 2>&1 || fail "no Docker engine answers (start one: dockerd --ip=127.0.0.1 &; docs/docker.md)"
command -v mmdebstrap >/dev/null || fail "mmdebstrap is not installed (apt-get install mmdebstrap)"

# step NAME COMMAND...: run it with its output in $LOG; on failure the end of that output, then one line that
# names the step and its last line of output (the log itself is removed on exit).
step() {
    name=$1; shift
    echo "$name ..." >&2
    : >"$LOG"
    if ! "$@" >>"$LOG" 2>&1; then
        tail -n 20 "$LOG" | sed 's/^/    /' >&2
        fail "$name failed: $(tail -n 1 "$LOG")"
    fi
}

have() { [ "$REBUILD" = 0 ] && docker image inspect "$1" >/dev/null 2>&1; }

# Each builder chains its commands with &&: `set -e` does not apply inside a function run as `if ! step ...`.
build_base() {
    mmdebstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,curl \
        bookworm "$WORK/base.tar" "$MIRROR" \
        && docker import "$WORK/base.tar" "$BASE"
}

build_wheels() {
    mkdir -p "$WORK/wheels" \
        && pip wheel --quiet -r "$ROOT/requirements.txt" -w "$WORK/wheels" \
        && tar -C "$WORK/wheels" -cf "$WORK/wheels.tar" . \
        && docker import --change 'CMD ["true"]' "$WORK/wheels.tar" "$WHEELS"
}

# Unstable's Release file carries a Valid-Until date; a mirror or proxy snapshot older than a week fails it, and the
# packages are still signed, so the date check is off for this one build.
build_nginx() {
    # shellcheck disable=SC2016  # "$1" is the hook's argument (the new root), expanded by mmdebstrap
    mmdebstrap --variant=minbase --include=nginx --aptopt='Acquire::Check-Valid-Until "false"' \
        --customize-hook='rm -f "$1"/etc/nginx/sites-enabled/default' sid "$WORK/nginx.tar" "$MIRROR" \
        && docker import --change 'CMD ["nginx", "-g", "daemon off;"]' \
        "$WORK/nginx.tar" "$NGINX"
}

# image NAME DESCRIPTION BUILDER: keep NAME when it exists, else build it as one step.
image() {
    if have "$1"; then echo "$1 exists" >&2; else step "$2" "$3"; fi
}

image "$BASE" "base image $BASE (Debian 12 + Python 3.11)" build_base
image "$WHEELS" "wheels image $WHEELS (pip wheel -r requirements.txt)" build_wheels
image "$NGINX" "nginx image $NGINX (Debian unstable's nginx)" build_nginx

cat <<EOF
export GPT_BASE_IMAGE=$BASE GPT_WHEELS_IMAGE=$WHEELS GPT_NGINX_IMAGE=$NGINX DOCKER_BUILDKIT=1
docker compose -f docker/docker-compose.yml -f docker/docker-compose.cpu.yml up -d --build
EOF
