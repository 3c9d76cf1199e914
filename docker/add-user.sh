#!/bin/sh
# The image's user: uid/gid 1000 (the manifests run as 1000:1000). Bases that already have uid 1000 (Ubuntu
# 24.04 ships "ubuntu") keep their user, since a second useradd --uid 1000 would fail the build.
# Usage: add-user.sh [PREFIX]   (PREFIX: apply to another root tree, as useradd --prefix does; for tests)
set -eu
P="${1:-}"
has_id() { cut -d: -f3 "$P/etc/$1" | grep -qx 1000; }
if ! has_id group; then groupadd ${P:+--prefix "$P"} --gid 1000 dcv2; fi
if ! has_id passwd; then
  useradd ${P:+--prefix "$P"} --uid 1000 --gid 1000 --no-create-home --home-dir /home/dcv2 \
    --shell /usr/sbin/nologin dcv2
fi
mkdir -p "$P/home/dcv2" "$P/data" "$P/checkpoints"
chown 1000:1000 "$P/home/dcv2" "$P/data" "$P/checkpoints"
