#!/usr/bin/env bash
# Build the agent image from deploy/Containerfile with no container registry:
#   1. a Debian bookworm base root filesystem made by mmdebstrap from Debian's own packages,
#      cached as a tarball under $CACHE keyed by the options that make it;
#   2. that tarball imported as localhost/stockade-base:<key>;
#   3. deploy/Containerfile built FROM it (build argument BASE) by buildah, in chroot isolation
#      (no cgroups or runtime needed at build time), tagged localhost/stockade:<inputs key> and
#      localhost/stockade:<version>. An image whose inputs did not change is reused.
# Prints the image reference (localhost/stockade:<key>) as its last line. Needs root, mmdebstrap,
# buildah, podman and the repository's venv for pip (`make image` installs them).
set -euo pipefail
cd "$(dirname "$0")/../.."

CACHE=${STOCKADE_IMAGE_CACHE:-/var/cache/stockade-image}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Fixed timestamps: the same packages give the same tarball, the same inputs the same layers.
EPOCH=1735689600  # 2025-01-01
PY=${PY:-.venv/bin/python}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
# minbase (essential + apt, like debian:bookworm-slim); no docs, man pages or locales (they
# would be a fifth of the image), no recommends, also for the Containerfile's apt-get later.
# Merged /usr by directory symlinks as debootstrap makes it (the default hook installs the
# usrmerge package instead, which pulls in perl: 50 MB).
BASE_OPTS=(--variant=minbase --mode=root --format=tar
           --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
           --aptopt='APT::Install-Recommends "false"'
           --dpkgopt='path-exclude=/usr/share/man/*'
           --dpkgopt='path-exclude=/usr/share/locale/*'
           --dpkgopt='path-exclude=/usr/share/doc/*'
           --dpkgopt='path-include=/usr/share/doc/*/copyright'
           --dpkgopt='path-exclude=/usr/share/info/*')

if [ -n "${BASE:-}" ]; then  # e.g. docker.io/library/debian:bookworm-slim, pulled by buildah
    base_key=$(printf '%s' "$BASE" | sha256sum | cut -c1-16)
    base_ref=$BASE
else
    base_key=$(printf '%s\n' "$SUITE" "$MIRROR" "${BASE_OPTS[@]}" | sha256sum | cut -c1-16)
    base_tar=$CACHE/base-$SUITE-$base_key.tar
    base_ref=localhost/stockade-base:$SUITE-$base_key
    mkdir -p "$CACHE"
    if [ ! -s "$base_tar" ]; then
        echo "image: making the $SUITE base root filesystem with mmdebstrap -> $base_tar" >&2
        SOURCE_DATE_EPOCH=$EPOCH mmdebstrap "${BASE_OPTS[@]}" "$SUITE" "$base_tar.tmp" "$MIRROR" >&2
        mv "$base_tar.tmp" "$base_tar"
    fi
    if ! podman image exists "$base_ref"; then
        podman import --quiet "$base_tar" "$base_ref" >&2
    fi
fi

# The build context holds exactly what the Containerfile copies (no venv, caches or tests).
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp deploy/Containerfile pyproject.toml "$ctx"/
tar -c --exclude=__pycache__ --exclude='*.pyc' agent bpf | tar -C "$ctx" -x
# Wheels of the agent's dependencies (and its build backend) for the image's Python (the
# build machine's pip, so its index and TLS setup apply; binary wheels only: no compiler
# in the image, none needed to build it).
deps=$("$PY" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
mapfile -t reqs <<<"$deps"
"$PY" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
    --python-version 3.11 --platform manylinux2014_x86_64 --implementation cp \
    -d "$ctx/wheels" "${reqs[@]}" 'setuptools>=77' >&2
key=$( (echo "$base_key"; cd "$ctx" && find . -type f | LC_ALL=C sort | xargs sha256sum) | sha256sum | cut -c1-16)
ref=localhost/stockade:$key
if podman image exists "$ref"; then
    echo "image: $ref is up to date" >&2
else
    echo "image: building $ref FROM $base_ref" >&2
    buildah build --isolation chroot --layers --timestamp "$EPOCH" \
        --build-arg BASE="$base_ref" -f "$ctx/Containerfile" \
        -t "$ref" -t "localhost/stockade:$VERSION" "$ctx" >&2
fi
# Older builds and bases go (layers still used stay as the build cache).
podman images --format '{{.Repository}}:{{.Tag}}' |
    grep -E '^localhost/stockade(-base)?:' | grep -v -x -e "$ref" -e "localhost/stockade:$VERSION" -e "$base_ref" |
    xargs -r podman rmi >/dev/null 2>&1 || true
if [ -n "${base_tar:-}" ]; then
    find "$CACHE" -maxdepth 1 -name 'base-*.tar' ! -path "$base_tar" -delete
fi
size=$(podman image inspect --format '{{.Size}}' "$ref")
echo "image: $ref, $((size / 1000000)) MB uncompressed" >&2
echo "$ref"
