#!/usr/bin/env bash
# Builds the trainer image (docker/Dockerfile, unchanged) on a locally made base, and a pause image, and imports
# both into the containerd store of the end-to-end tests' kubelet node. No registry is needed: the base is a
# debootstrap'ed Debian bookworm with torch installed from wheels the host's pip fetched; `docker build` reaches
# the package index the host's pip reaches (the base carries the host's CA bundle and an /etc/pip.conf).
#
#   make image        (or: sudo tests/node/image.sh)
#
# What stays between runs (a second run only checks, rebuilds nothing that is current):
#   /var/lib/dcv2-k8s-test/docker       data root of the dockerd started here, only while this script runs
#   /var/lib/dcv2-k8s-test/containerd   the node's containerd store (namespace k8s.io, snapshotter overlayfs)
#   /var/lib/dcv2-k8s-test/base-wheels  the wheels of the base's torch, torchvision, numpy (only to rebuild the base)
# Logs of the long steps: build/node/logs/. Needs root, debootstrap, docker.io (dockerd 20.10), containerd 1.6, go.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

STATE=/var/lib/dcv2-k8s-test
RUNDIR=/run/dcv2-k8s-test
DOCKER_ROOT=$STATE/docker
DOCKER_SOCK=$RUNDIR/docker.sock
DOCKER_EXEC=$RUNDIR/docker-exec
DOCKER_PIDFILE=$RUNDIR/docker.pid
CTRD_ROOT=$STATE/containerd
CTRD_STATE=$RUNDIR/containerd-import
CTRD_SOCK=$CTRD_STATE/containerd.sock
CTRD_NS=k8s.io
CTRD_SNAPSHOTTER=overlayfs
WHEELS=$STATE/base-wheels
ROOTFS=$STATE/base-rootfs

# the versions of the project's .venv (Makefile: install); the base's tag names them
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
NUMPY_VERSION=2.4.6
SUITE=bookworm
BASE_TAG=dcv2-k8s-testbase:$SUITE-torch$TORCH_VERSION
IMAGE_TAG=dcv2-k8s:test
PAUSE_TAG=dcv2-k8s-test/pause:1
IMAGE_PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

DOCKER=/usr/bin/docker
DOCKERD=/usr/sbin/dockerd
CONTAINERD=/usr/bin/containerd
CTR=/usr/bin/ctr
GO=${GO:-$(command -v go 2>/dev/null || echo /usr/local/go/bin/go)}
HOST_PY=${HOST_PY:-$ROOT/.venv/bin/python}   # the host's pip (and its configuration: cert, find-links, index)
[ -x "$HOST_PY" ] || HOST_PY=$(command -v python3)
LOGS=$ROOT/build/node/logs

export DOCKER_HOST=unix://$DOCKER_SOCK
export DOCKER_CONFIG=$RUNDIR/docker-client   # no ~/.docker/config.json (proxies, credential helpers)
export DOCKER_BUILDKIT=0                     # the classic builder: takes the base from the local store as it is
# 2 shared cores: everything below (dockerd, containerd and the builds they run included) at a lower priority
renice -n 10 -p $$ >/dev/null 2>&1 || true
ionice -c 2 -n 7 -p $$ >/dev/null 2>&1 || true

# ---------------------------------------------------------------------------------------------------- progress
T0=$(date +%s)
STEP="start"
STEP_T0=$T0
STEP_LOG=""
SUMMARY=()
step() {   # step NAME: a new step begins (the previous one is done)
  step_done
  STEP=$1; STEP_T0=$(date +%s); STEP_LOG=""
  echo "[image +$((STEP_T0 - T0))s] $STEP ..."
}
step_done() {
  if [ "$STEP" != start ] && [ -n "$STEP" ]; then
    local s=$(( $(date +%s) - STEP_T0 ))
    echo "[image +$(( $(date +%s) - T0 ))s] $STEP: done (${s}s)"
    SUMMARY+=("$(printf '%5ss  %s' "$s" "$STEP")")
  fi
  STEP=""
}
note() { echo "[image +$(( $(date +%s) - T0 ))s]   $*"; }
logged() {  # logged NAME CMD...: CMD's output into $LOGS/NAME.log (its tail is shown if the step fails)
  local name=$1; shift
  mkdir -p "$LOGS"
  STEP_LOG=$LOGS/$name.log
  note "log: ${STEP_LOG#"$ROOT"/}"
  "$@" >"$STEP_LOG" 2>&1
}

# ------------------------------------------------------------------------------------------ processes, cleanup
DOCKERD_PID=""
CTRD_PID=""
OPT_CONTAINERD_MADE=""
OWN_RUNDIR=""
alive() { [ -n "$1" ] && [ -r "/proc/$1/stat" ] && ! grep -q '^[0-9]* (.*) Z ' "/proc/$1/stat" 2>/dev/null; }
stop_pid() {  # stop_pid NAME PID: SIGTERM, up to 30 s, then SIGKILL
  local name=$1 pid=$2 i
  alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 60); do alive "$pid" || break; sleep 0.5; done
  if alive "$pid"; then
    echo "image.sh: $name (PID $pid) did not stop within 30s after SIGTERM: SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
    for i in $(seq 1 20); do alive "$pid" || break; sleep 0.5; done
  fi
  wait "$pid" 2>/dev/null || true
}
umount_under() {  # unmount everything mounted at or below $1, deepest first
  local m
  awk -v d="$1" '$2 == d || index($2, d "/") == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m"
  done
}
stop_dockerd() {
  [ -n "$DOCKERD_PID" ] || return 0
  stop_pid dockerd "$DOCKERD_PID"
  DOCKERD_PID=""
  # dockerd's own containerd (a child it supervises) goes with it; after a SIGKILL it could stay behind
  local cpid
  cpid=$(cat "$DOCKER_EXEC/containerd/containerd.pid" 2>/dev/null || true)
  if alive "$cpid" && tr '\0' ' ' <"/proc/$cpid/cmdline" | grep -q -- "$DOCKER_EXEC"; then
    stop_pid "dockerd's containerd" "$cpid"
  fi
  rm -f "$DOCKER_PIDFILE"
  umount_under "$DOCKER_EXEC"   # dockerd leaves its netns/default (nsfs) mounted
  rm -rf --one-file-system "$DOCKER_EXEC"
  # dockerd's containerd makes /opt/containerd/{bin,lib} (empty) and cannot be told otherwise
  if [ -n "$OPT_CONTAINERD_MADE" ]; then
    rmdir /opt/containerd/bin /opt/containerd/lib /opt/containerd 2>/dev/null || true
  fi
}
stop_containerd() {
  [ -n "$CTRD_PID" ] || return 0
  stop_pid containerd "$CTRD_PID"
  CTRD_PID=""
  umount_under "$CTRD_STATE"
  rm -rf --one-file-system "$CTRD_STATE"
}
remove_rootfs() {
  [ -e "$ROOTFS" ] || return 0
  umount_under "$ROOTFS"
  rm -rf --one-file-system "$ROOTFS"
}
on_exit() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  if [ "$rc" -ne 0 ]; then
    if [ -n "$STEP_LOG" ] && [ -s "$STEP_LOG" ]; then
      echo "---- last lines of ${STEP_LOG#"$ROOT"/} ----" >&2; tail -n 25 "$STEP_LOG" >&2; echo "----" >&2
    fi
  fi
  stop_containerd
  stop_dockerd
  remove_rootfs
  if [ -n "$OWN_RUNDIR" ]; then   # not when another run of this script is using it
    rm -rf --one-file-system "$DOCKER_CONFIG"
    rm -f "$RUNDIR/docker-daemon.json"
    rmdir "$RUNDIR" 2>/dev/null || true   # what else is in it is not ours
  fi
  if [ "$rc" -eq 130 ] || [ "$rc" -eq 143 ]; then
    echo "image.sh: INTERRUPTED in step '${STEP:-?}' (exit $rc, after $(( $(date +%s) - T0 ))s)" >&2
  elif [ "$rc" -ne 0 ]; then
    echo "image.sh: FAILED in step '${STEP:-?}' (exit $rc, after $(( $(date +%s) - T0 ))s)" >&2
  fi
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# -------------------------------------------------------------------------------------------------- the steps
step "checks"
[ "$(id -u)" = 0 ] || { echo "image.sh: needs root (debootstrap, dockerd, containerd)" >&2; exit 1; }
for b in "$DOCKER" "$DOCKERD" "$CONTAINERD" "$CTR" /usr/sbin/debootstrap "$GO" "$HOST_PY"; do
  [ -x "$b" ] || { echo "image.sh: missing $b" >&2; exit 1; }
done
mkdir -p "$STATE" "$RUNDIR" "$DOCKER_CONFIG" "$LOGS"
if [ -e "$DOCKER_PIDFILE" ] && alive "$(cat "$DOCKER_PIDFILE")"; then
  echo "image.sh: a dockerd (PID $(cat "$DOCKER_PIDFILE"), $DOCKER_PIDFILE) already runs on this data root; stop it first" >&2
  exit 1
fi
if [ -S "$CTRD_SOCK" ] && "$CTR" --address "$CTRD_SOCK" version >/dev/null 2>&1; then
  echo "image.sh: a containerd already serves $CTRD_SOCK; stop it first" >&2
  exit 1
fi
rm -f "$DOCKER_PIDFILE"
OWN_RUNDIR=1

step "pause binary (go build)"
mkdir -p build/node
(cd tests/node/pause && CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-buildvcs=false \
  "$GO" build -trimpath -ldflags "-s -w" -o "$ROOT/build/node/pause" .)
PAUSE_SHA=$(sha256sum build/node/pause | cut -c1-64)

step "start dockerd"
echo '{}' >"$RUNDIR/docker-daemon.json"   # not /etc/docker/daemon.json
mkdir -p "$DOCKER_ROOT" "$DOCKER_EXEC"
[ -e /opt/containerd ] || OPT_CONTAINERD_MADE=1
# no bridge, no iptables/masquerading, no ip_forward: the machine's network settings stay as they are
"$DOCKERD" --config-file "$RUNDIR/docker-daemon.json" --host "$DOCKER_HOST" \
  --data-root "$DOCKER_ROOT" --exec-root "$DOCKER_EXEC" --pidfile "$DOCKER_PIDFILE" \
  --iptables=false --ip-masq=false --ip-forward=false --bridge=none \
  --exec-opt native.cgroupdriver=cgroupfs --storage-driver overlay2 \
  >"$LOGS/dockerd.log" 2>&1 &
DOCKERD_PID=$!
STEP_LOG=$LOGS/dockerd.log
for i in $(seq 1 120); do
  "$DOCKER" version >/dev/null 2>&1 && break
  alive "$DOCKERD_PID" || { echo "image.sh: dockerd exited" >&2; exit 1; }
  sleep 0.5
done
"$DOCKER" version --format 'dockerd {{.Server.Version}}' >/dev/null
note "dockerd PID $DOCKERD_PID, $DOCKER_HOST, data root $DOCKER_ROOT"

if "$DOCKER" image inspect "$BASE_TAG" >/dev/null 2>&1; then
  note "base $BASE_TAG present: not rebuilt"
else
  step "base: download wheels (host pip)"
  mkdir -p "$WHEELS"
  # the host's pip and its configuration (cert, find-links, index); binary wheels only: the chroot builds nothing
  logged base-wheels "$HOST_PY" -m pip download --disable-pip-version-check --only-binary=:all: --dest "$WHEELS" \
    pip "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" "numpy==$NUMPY_VERSION"
  note "$(du -sh "$WHEELS" | cut -f1) in ${WHEELS}"

  step "base: debootstrap --variant=minbase $SUITE"
  remove_rootfs   # a run that was killed outright may have left one
  # the Debian mirror apt uses on this machine (deb822 .sources first, then sources.list), read now
  MIRROR=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk -v s="$SUITE" '
    BEGIN { RS = ""; FS = "\n" }
    { uri = ""; ok = 0
      for (i = 1; i <= NF; i++) {
        if ($i ~ /^URIs:/) { split($i, a, /[ \t]+/); uri = a[2] }
        if ($i ~ /^Suites:/ && $i ~ ("[ \t]" s "([ \t]|$)")) ok = 1
      }
      if (ok && uri != "") { print uri; exit } }')
  if [ -z "$MIRROR" ]; then
    MIRROR=$(awk -v s="$SUITE" '$1 == "deb" && $3 == s { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
  fi
  [ -n "$MIRROR" ] || { echo "image.sh: no apt source for $SUITE found in /etc/apt" >&2; exit 1; }
  # passwd: groupadd/useradd for docker/add-user.sh (minbase has it as Priority: required; named to be sure)
  logged debootstrap debootstrap --variant=minbase --components=main \
    --include=python3,python3-venv,ca-certificates,passwd "$SUITE" "$ROOTFS" "$MIRROR"
  for b in groupadd useradd; do
    [ -x "$ROOTFS/usr/sbin/$b" ] || { echo "image.sh: the base lacks /usr/sbin/$b (docker/add-user.sh)" >&2; exit 1; }
  done

  step "base: venv + torch $TORCH_VERSION (image's pip, no network)"
  mount -t proc proc "$ROOTFS/proc"
  [ -c "$ROOTFS/dev/null" ] || mount --bind /dev "$ROOTFS/dev"
  mkdir -p "$ROOTFS/tmp/wheels"
  mount --bind -o ro "$WHEELS" "$ROOTFS/tmp/wheels"
  inchroot() { chroot "$ROOTFS" /usr/bin/env -i PATH="$IMAGE_PATH" HOME=/root LANG=C.UTF-8 "$@"; }
  logged base-venv inchroot sh -euxc "
    python3 -m venv /opt/venv
    /opt/venv/bin/python -m pip install --no-index --find-links /tmp/wheels --no-cache-dir --upgrade pip
    /opt/venv/bin/python -m pip install --no-index --find-links /tmp/wheels --no-cache-dir \
      torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION numpy==$NUMPY_VERSION
    /opt/venv/bin/python -m pip check
    /opt/venv/bin/python -c 'import torch, torchvision, numpy; print(torch.__version__, torchvision.__version__, numpy.__version__)'
  "
  note "$(tail -n 1 "$STEP_LOG")"
  umount_under "$ROOTFS/tmp/wheels"; rmdir "$ROOTFS/tmp/wheels"
  umount_under "$ROOTFS/dev"; umount_under "$ROOTFS/proc"

  step "base: CA bundle, pip.conf, clean"
  # the host's CA bundle, so that pip in `docker build` trusts what the host's pip trusts
  cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
  {
    echo "[global]"
    echo "cert = /etc/ssl/certs/ca-certificates.crt"
    # the host's package index settings, if it has any (read now, not written into the project)
    "$HOST_PY" -m pip config list 2>/dev/null | sed -nE \
      "s/^[^.]*\.(index-url|extra-index-url|trusted-host|default-timeout|timeout)='(.*)'$/\1 = \2/p" | sort -u
  } >"$ROOTFS/etc/pip.conf"
  note "pip.conf: $(grep -v '^\[' "$ROOTFS/etc/pip.conf" | tr '\n' ' ')"
  rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/root/.cache \
    "$ROOTFS"/tmp/* "$ROOTFS"/var/log/*.log
  : >"$ROOTFS/etc/resolv.conf"   # the runtime provides it; not the host's

  step "base: docker import $BASE_TAG"
  tar --numeric-owner --xattrs -C "$ROOTFS" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -cf - . \
    | "$DOCKER" import --change "ENV PATH=$IMAGE_PATH" \
        --message "debootstrap minbase $SUITE + torch $TORCH_VERSION torchvision $TORCHVISION_VERSION numpy $NUMPY_VERSION" \
        - "$BASE_TAG" >/dev/null
  remove_rootfs
fi
note "base $BASE_TAG: $("$DOCKER" image inspect -f '{{.Id}} {{.Size}}' "$BASE_TAG" | awk '{ printf "%s, %.2f GB", substr($1, 1, 19), $2 / 1e9 }')"

step "docker build $IMAGE_TAG"
OLD_ID=$("$DOCKER" image inspect -f '{{.Id}}' "$IMAGE_TAG" 2>/dev/null || true)
logged docker-build "$DOCKER" build --network host -f docker/Dockerfile --build-arg "BASE_IMAGE=$BASE_TAG" \
  -t "$IMAGE_TAG" .
if [ -n "$OLD_ID" ] && [ "$OLD_ID" != "$("$DOCKER" image inspect -f '{{.Id}}' "$IMAGE_TAG")" ]; then
  # the image this one replaces (its own layers, ~0.5 GB); the build cache of the unchanged steps stays
  "$DOCKER" image rm "$OLD_ID" >/dev/null 2>&1 || true
fi
note "$IMAGE_TAG: $("$DOCKER" image inspect -f '{{.Id}} {{.Size}}' "$IMAGE_TAG" | awk '{ printf "%s, %.2f GB", substr($1, 1, 19), $2 / 1e9 }')"

step "pause image $PAUSE_TAG"
if [ "$("$DOCKER" image inspect -f '{{index .Config.Labels "dcv2-k8s-test.pause.sha256"}}' "$PAUSE_TAG" 2>/dev/null || true)" = "$PAUSE_SHA" ]; then
  note "present, same binary"
else
  tar --numeric-owner --owner=0 --group=0 -C build/node -cf - pause \
    | "$DOCKER" import --change 'ENTRYPOINT ["/pause"]' --change "LABEL dcv2-k8s-test.pause.sha256=$PAUSE_SHA" \
        - "$PAUSE_TAG" >/dev/null
fi

step "start containerd (import)"
mkdir -p "$CTRD_ROOT" "$CTRD_STATE"
cat >"$CTRD_STATE/config.toml" <<EOF
version = 2
root = "$CTRD_ROOT"
state = "$CTRD_STATE"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$CTRD_SOCK"
[plugins."io.containerd.internal.v1.opt"]
  path = "$CTRD_STATE/opt"
EOF
"$CONTAINERD" --config "$CTRD_STATE/config.toml" >"$LOGS/containerd-import.log" 2>&1 &
CTRD_PID=$!
STEP_LOG=$LOGS/containerd-import.log
for i in $(seq 1 60); do
  "$CTR" --address "$CTRD_SOCK" version >/dev/null 2>&1 && break
  alive "$CTRD_PID" || { echo "image.sh: containerd exited" >&2; exit 1; }
  sleep 0.5
done
"$CTR" --address "$CTRD_SOCK" version >/dev/null \
  || { echo "image.sh: containerd did not answer in 30s (does another containerd hold $CTRD_ROOT?)" >&2; exit 1; }
note "containerd PID $CTRD_PID, $CTRD_SOCK, root $CTRD_ROOT"
ctr_() { "$CTR" --address "$CTRD_SOCK" -n "$CTRD_NS" "$@"; }

# the config digest (= docker's image ID) of a containerd image; empty when it is absent
ctrd_config_digest() {
  local ref=$1 digest
  digest=$(ctr_ images ls | awk -v r="$ref" '$1 == r { print $3; exit }')
  [ -n "$digest" ] || return 0
  ctr_ content get "$digest" | python3 -c '
import json, subprocess, sys
m = json.load(sys.stdin)
if "manifests" in m:   # an index: the linux/amd64 manifest
    ms = [d for d in m["manifests"] if d.get("platform", {}).get("architecture", "amd64") == "amd64"]
    m = json.loads(subprocess.run(sys.argv[1:] + [ms[0]["digest"]], check=True, capture_output=True).stdout)
print(m["config"]["digest"])' "$CTR" --address "$CTRD_SOCK" -n "$CTRD_NS" content get
}
# docker's short names as the kubelet's CRI resolves them
ctrd_ref() { case $1 in */*) echo "docker.io/$1" ;; *) echo "docker.io/library/$1" ;; esac; }

for tag in "$IMAGE_TAG" "$PAUSE_TAG"; do
  step "containerd import $tag"
  ref=$(ctrd_ref "$tag")
  want=$("$DOCKER" image inspect -f '{{.Id}}' "$tag")
  have=$(ctrd_config_digest "$ref")
  ready=$(ctr_ images check -q --snapshotter "$CTRD_SNAPSHOTTER")   # complete and unpacked
  if [ "$have" = "$want" ] && grep -qxF "$ref" <<<"$ready"; then
    note "$ref present and unpacked, config ${want:0:19}: not imported again"
    continue
  fi
  # unpacked into overlayfs now, so that the first pod does not wait for it
  "$DOCKER" save "$tag" | ctr_ images import --snapshotter "$CTRD_SNAPSHOTTER" - >/dev/null
  have=$(ctrd_config_digest "$ref")
  [ "$have" = "$want" ] || { echo "image.sh: containerd has $ref with config '$have', docker has $want" >&2; exit 1; }
  ready=$(ctr_ images check -q --snapshotter "$CTRD_SNAPSHOTTER")
  grep -qxF "$ref" <<<"$ready" \
    || { echo "image.sh: $ref is not complete and unpacked in containerd" >&2; exit 1; }
  note "$ref imported and unpacked, config ${want:0:19}"
done

step "stop daemons"
stop_containerd
stop_dockerd
step_done
echo "[image +$(( $(date +%s) - T0 ))s] done: $IMAGE_TAG and $PAUSE_TAG in containerd $CTRD_ROOT (namespace $CTRD_NS)"
printf '  %s\n' "${SUMMARY[@]}"
