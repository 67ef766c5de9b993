#!/usr/bin/env bash
# An arm64 OCI image of the edge without a daemon or a registry: the cached arm64 Debian 12
# root of .ci/arm64.sh (run that first: it builds the root and downloads the wheels), the
# edge installed from aarch64 wheels, written as an OCI image layout by umoci.  Not part of
# CI (docs/arm64.md).  Run as root.
#
#   .ci/arm64_image.sh [LAYOUT]     # default ./edgepipe-arm64.oci, tag "edgepipe"
#   skopeo copy oci:edgepipe-arm64.oci:edgepipe docker://REGISTRY/edgepipe:TAG
#
# The image runs like the Containerfile's: user 10001, `edgepipe run -c
# /etc/edgepipe/pipeline.yaml`, the filter library in /opt/edgepipe/filters, port 9108.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${EDGEPIPE_ARM64_CACHE:-/var/cache/edgepipe-arm64}
OUT=$(realpath -m "${1:-edgepipe-arm64.oci}")
TAG=edgepipe
die() { echo "arm64_image: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root"
command -v umoci >/dev/null 2>&1 || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq umoci >/dev/null
}
base=$(ls -td "$CACHE"/root-*/.complete 2>/dev/null | head -1 | xargs -r dirname)
[ -n "$base" ] || die "no cached arm64 root in $CACHE: run .ci/arm64.sh first"
compgen -G "$CACHE/wheels/edgepipe-*.whl" >/dev/null || die "no wheels in $CACHE/wheels"

work=$(mktemp -d "$CACHE/image.XXXXXX")
rootfs=$work/bundle/rootfs
cleanup() {
  local rc=$?
  for m in "$rootfs/dev" "$rootfs/proc"; do
    mountpoint -q "$m" 2>/dev/null && { umount "$m" || umount -l "$m"; }
  done
  rm -rf "$work"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

rm -rf "$OUT"
umoci init --layout "$OUT"
umoci new --image "$OUT:$TAG"
umoci unpack --image "$OUT:$TAG" "$work/bundle" >/dev/null
cp -a "$base/." "$rootfs/"
rm -f "$rootfs/.complete"
mkdir -p "$rootfs/srv/wheels"
cp "$CACHE"/wheels/*.whl "$rootfs/srv/wheels/"
mount -t proc proc "$rootfs/proc"
mount --bind /dev "$rootfs/dev"
in_root() { chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "$@"; }
# the edge only ([project].dependencies), from wheels, into a venv without pip
in_root python3 -m venv /opt/venv
in_root /opt/venv/bin/pip install -q --no-index --find-links /srv/wheels --only-binary=:all: \
  --no-compile edgepipe
in_root /opt/venv/bin/python -m pip uninstall -q -y pip setuptools
rm -f "$rootfs/opt/venv/bin/edgepipe-cloud"  # the cloud extra is not installed
in_root groupadd --gid 10001 edgepipe
in_root useradd --uid 10001 --gid 10001 --home-dir /var/lib/edgepipe --no-create-home \
  --shell /usr/sbin/nologin edgepipe
install -d -o 10001 -g 10001 -m 0700 "$rootfs/var/lib/edgepipe"
install -d -m 0755 "$rootfs/etc/edgepipe" "$rootfs/etc/edgepipe/chain" "$rootfs/etc/edgepipe/modules" \
  "$rootfs/opt/edgepipe/filters"
cp filters/lib/*.wasm "$rootfs/opt/edgepipe/filters/"
in_root /opt/venv/bin/edgepipe --help >/dev/null  # it runs
umount "$rootfs/dev" "$rootfs/proc"
# what an image does not need: the wheels, caches, documentation, translations, apt lists
rm -rf "$rootfs/srv/wheels" "$rootfs"/var/cache/* "$rootfs"/var/lib/apt/lists/* \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
  "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*.log "$rootfs"/root/.cache
find "$rootfs" -name __pycache__ -type d -prune -exec rm -rf {} +

umoci repack --image "$OUT:$TAG" "$work/bundle"
umoci config --image "$OUT:$TAG" --architecture=arm64 --os=linux \
  --config.user=10001:10001 --config.workingdir=/var/lib/edgepipe \
  --config.env=PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --config.env=PYTHONUNBUFFERED=1 --config.env=PYTHONDONTWRITEBYTECODE=1 \
  --config.env=MALLOC_ARENA_MAX=2 --config.env=HOME=/var/lib/edgepipe \
  --config.exposedports=9108/tcp --config.entrypoint=edgepipe \
  --config.cmd=run --config.cmd=-c --config.cmd=/etc/edgepipe/pipeline.yaml
umoci gc --layout "$OUT"

uncompressed=$(du -sb --apparent-size "$rootfs" | cut -f1)
compressed=$(find "$OUT/blobs" -type f -printf '%s\n' | awk '{s += $1} END {print s}')
printf 'image %s:%s (linux/arm64)\n  uncompressed root: %d MB\n  compressed (all blobs): %d MB\n' \
  "$OUT" "$TAG" $((uncompressed / 1000000)) $((compressed / 1000000))
