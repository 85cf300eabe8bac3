#!/usr/bin/env bash
# The local base image of `make container`, for machines that cannot pull python:3.11-slim: Debian bookworm made
# with mmdebstrap (no registry involved) and imported into podman. It offers what BentoML's generated Dockerfile
# expects of python:3.11-slim: Python 3.11 (bookworm's python3) with its headers (Triton compiles its launcher
# against them on a GPU), pip installing system-wide, useradd, CA certificates, and apt sources to install more.
#
# Made once: the root file system is cached as a tarball and the image kept, both keyed by this script.
# Prints the image reference alone on its last line.
set -euo pipefail

cache=${GROK3D_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/grok3d}/container
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

key=$(sha256sum < "$0" | cut -c1-12)
image=localhost/grok3d-base:bookworm-$key
tarball=$cache/bookworm-$key.tar

if ! podman image exists "$image"; then
    if [ ! -s "$tarball" ]; then
        mkdir -p "$cache"
        rm -f "$cache"/bookworm-*.tar  # an older recipe's
        echo "Making the Debian bookworm base with mmdebstrap (once; cached in $cache)" >&2
        # Bookworm marks its Python externally managed (PEP 668); this image is Python's alone, so pip installs
        # system-wide there, as it does on python:3.11-slim (the hook gets the new root file system as $1).
        mmdebstrap --variant=minbase --format=tar \
            --include=python3,python3-pip,python3-dev,passwd,ca-certificates \
            --customize-hook='rm -f "$1"/usr/lib/python3.11/EXTERNALLY-MANAGED' \
            bookworm "$tarball.part" \
            "deb $mirror bookworm main" "deb $mirror bookworm-updates main" \
            "deb $security bookworm-security main" >&2
        mv "$tarball.part" "$tarball"
    fi
    podman import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' "$tarball" "$image" >/dev/null
fi
# An older recipe's image loses its tag (its layers stay while images built on it do).
for old in $(podman images --format '{{.Repository}}:{{.Tag}}' --filter 'reference=localhost/grok3d-base:bookworm-*'); do
    [ "$old" = "$image" ] || podman rmi "$old" >/dev/null 2>&1 || true
done
echo "$image"
