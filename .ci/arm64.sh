#!/usr/bin/env bash
# The edge on arm64, as it runs on the boards: an arm64 Debian 12 root (debootstrap minbase
# + mosquitto + python3), the edge installed into it from aarch64 wheels only (no compiler),
# then, under QEMU_CPU=cortex-a53 (the Raspberry Pi 3 / Zero 2 core): `edgepipe validate`
# of the example, the end-to-end check (.ci/arm64_e2e.py), tests/test_e2e.py, the Wasm
# sandbox tests and tests/test_arm64_fixes.py.  Any failure exits non-zero.
#
# On an x86-64 machine the root runs through qemu-user-static (binfmt_misc); on an arm64
# machine (a Pi) the same script runs it natively.  Run as root.  Network: PyPI and the
# Debian mirror only.  docs/arm64.md says what this proves and what it cannot.
#
#   .ci/arm64.sh                        # what CI runs
#   EDGEPIPE_ARM64_CPU=cortex-a72 .ci/arm64.sh     # another CPU model (qemu only)
#   EDGEPIPE_ARM64_KEEP=1 .ci/arm64.sh  # keep the run's root for a look afterwards
#
# The base root is cached under $EDGEPIPE_ARM64_CACHE (default /var/cache/edgepipe-arm64),
# keyed by a hash of the suite, mirror and package list; downloaded wheels are cached
# there too.  Every run works on a fresh copy of the cached root, so a run never changes it.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1

CACHE=${EDGEPIPE_ARM64_CACHE:-/var/cache/edgepipe-arm64}
CPU=${EDGEPIPE_ARM64_CPU:-cortex-a53}
MIRROR=${EDGEPIPE_ARM64_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
PACKAGES=mosquitto,python3,python3-venv,ca-certificates
# The root's /etc/hosts (minbase has none, and the TLS tests need `localhost`).
HOSTS=$'127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n'

t0=$SECONDS
step() { printf '\n== arm64 [%3ds] %s\n' "$((SECONDS - t0))" "$*"; }
die() { echo "arm64: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap and chroot need it)"

native=0
[ "$(uname -m)" = aarch64 ] && native=1

# -- host tools ------------------------------------------------------------------------------
need=()
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
if [ $native -eq 0 ]; then
  [ -x /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static)
  command -v update-binfmts >/dev/null 2>&1 || need+=(binfmt-support)
fi
if [ ${#need[@]} -gt 0 ]; then
  step "installing ${need[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [ $native -eq 0 ]; then
  # binfmt_misc: aarch64 ELF files run through qemu-aarch64-static, also inside the chroot
  # (the F flag opens the interpreter at registration, so the root needs no copy of it)
  [ -e /proc/sys/fs/binfmt_misc/register ] ||
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64 ||
    die "cannot register qemu-aarch64 with binfmt_misc"
  grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 ||
    die "binfmt_misc: qemu-aarch64 is registered but disabled"
  grep -q '^flags:.*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 ||
    die "binfmt_misc: qemu-aarch64 lacks the F (fix binary) flag; re-register it with update-binfmts"
fi

# -- the base root, cached by what goes into it -----------------------------------------------
key=$(printf '%s\n' "root-v1" "$SUITE" "$MIRROR" "$PACKAGES" "$HOSTS" | sha256sum | cut -c1-16)
base=$CACHE/root-$key
mkdir -p "$CACHE"
if [ ! -e "$base/.complete" ]; then
  step "building the arm64 Debian $SUITE root ($PACKAGES) in $base"
  rm -rf "$base.tmp"
  debootstrap --arch=arm64 --variant=minbase --include="$PACKAGES" "$SUITE" "$base.tmp" "$MIRROR" \
    >"$CACHE/debootstrap-$key.log" 2>&1 ||
    { tail -30 "$CACHE/debootstrap-$key.log" >&2; die "debootstrap failed (log: $CACHE/debootstrap-$key.log)"; }
  printf '%s' "$HOSTS" >"$base.tmp/etc/hosts"
  rm -rf "$base.tmp"/var/cache/apt/archives/*.deb "$base.tmp"/var/lib/apt/lists/*
  touch "$base.tmp/.complete"
  rm -rf "$base"
  mv "$base.tmp" "$base"
else
  step "cached arm64 root $base"
fi

# -- wheels: the edge (pure Python) and every dependency as aarch64 cp311 wheels -------------
# (pip on the host from a venv of its own: it only builds and downloads, never installs here)
wheels=$CACHE/wheels
hostpy=$CACHE/host-venv/bin/python
[ -x "$hostpy" ] || python3 -m venv "$CACHE/host-venv"
mkdir -p "$wheels"
step "downloading aarch64 wheels to $wheels"
rm -f "$wheels"/edgepipe-*.whl
"$hostpy" -m pip wheel -q --no-deps --wheel-dir "$wheels" "$REPO"
edge_whl=$(ls "$wheels"/edgepipe-*.whl)
# the local wheel by path: a package of the same name on PyPI can never stand in for it
"$hostpy" -m pip download -q --dest "$wheels" --only-binary=:all: --implementation cp \
  --python-version 3.11 --platform manylinux2014_aarch64 --platform manylinux_2_28_aarch64 \
  "$edge_whl[cloud]" pytest pytest-timeout

# -- this run's root: a fresh copy of the base, with mounts cleaned up on any exit ------------
run=$(mktemp -d "$CACHE/run.XXXXXX")
root=$run/root
cleanup() {
  local rc=$?
  for m in "$root/dev" "$root/proc"; do
    mountpoint -q "$m" 2>/dev/null && { umount "$m" || umount -l "$m"; }
  done
  if [ "${EDGEPIPE_ARM64_KEEP:-}" = 1 ]; then
    echo "arm64: kept $root"
  else
    rm -rf "$run"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
step "copying the root to $root"
cp -a "$base" "$root"
mount -t proc proc "$root/proc"
mount --bind /dev "$root/dev"
mkdir -p "$root/srv/edgepipe" "$root/srv/wheels"
# the working tree as it is (tracked and new files, not ignored ones)
git ls-files -z --cached --others --exclude-standard |
  tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$root/srv/edgepipe"
cp "$wheels"/*.whl "$root/srv/wheels/"

inside() {  # a command in the root, on the CPU model $on (default $CPU)
  chroot "$root" /usr/bin/env -i PATH=/opt/edgepipe/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 QEMU_CPU="${on:-$CPU}" CI=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore "$@"
}
[ $native -eq 1 ] && cpu_note="native" || cpu_note="qemu-user, QEMU_CPU=$CPU"
step "inside the root ($cpu_note): $(inside uname -m), $(inside python3 --version)"
[ "$(inside uname -m)" = aarch64 ] || die "the root does not run as aarch64"

step "installing the edge from aarch64 wheels (no index, no compiler)"
inside python3 -m venv /opt/edgepipe
inside pip install -q --no-index --find-links /srv/wheels --only-binary=:all: edgepipe
inside python3 -c 'import platform, wasmtime, cryptography, pydantic_core, zstandard, yaml
assert platform.machine() == "aarch64", platform.machine()'

step "edgepipe validate (the example pipeline.yaml)"
inside sh -c 'cd /srv/edgepipe && mkdir -p /etc/edgepipe && edgepipe keys generate -o /etc/edgepipe/store.key &&
  EDGEPIPE_DEVICE_SECRET=$(printf %064d 0) edgepipe validate -c pipeline.yaml'

step "installing the test tools from aarch64 wheels"
inside pip install -q --no-index --find-links /srv/wheels --only-binary=:all: \
  "edgepipe[cloud]" pytest pytest-timeout

step "end to end, the Wasm sandbox, the arm64 fixes"
inside sh -c 'cd /srv/edgepipe && python -m pytest -q -p no:cacheprovider \
  .ci/arm64_e2e.py tests/test_e2e.py tests/test_wasm_sandbox.py tests/test_arm64_fixes.py'

if [ $native -eq 0 ] && [ "$CPU" != max ]; then
  # qemu's "max" model has the Armv8.1+ features (LSE atomics, FP16, pointer auth) that a
  # Cortex-A53 lacks: code compiled for one is refused by the other; the AOT cache keys
  # entries by CPU features, so a directory shared by both keeps one entry each
  step "compiled Wasm across CPU models (max, $CPU)"
  aot() { on=$1 inside python3 /srv/edgepipe/.ci/arm64_aot.py "$2" "$3"; }
  echo "targets: max $(aot max compile /tmp/max.cwasm); $CPU $(aot "$CPU" compile /tmp/cpu.cwasm)"
  echo "max's code under $CPU: $(aot "$CPU" load /tmp/max.cwasm)"
  echo "$CPU's code under max: $(aot max load /tmp/cpu.cwasm)"
  got=""
  for on in max "$CPU" max "$CPU" max "$CPU"; do
    got+="$(aot "$on" cache /tmp/aot-cache | cut -d' ' -f1-2);"
  done
  n=$(find "$root/tmp/aot-cache" -name '*.cwasm' | wc -l)
  echo "AOT cache (hits misses) under max, $CPU, max, $CPU, max, $CPU: $got entries: $n"
  [ "$got" = "0 1;0 1;1 0;1 0;1 0;1 0;" ] && [ "$n" -eq 2 ] ||
    die "the AOT cache does not keep one entry per CPU model"
fi

step "passed on arm64 ($cpu_note)"
