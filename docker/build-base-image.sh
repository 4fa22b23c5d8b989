#!/usr/bin/env bash
# Make a local Debian bookworm base image for machines that cannot reach an image registry:
#   sudo docker/build-base-image.sh [IMAGE] [ROOTFS]
# then build with  --build-arg BASE_IMAGE=localhost/bookworm-base
# Needs: debootstrap, podman (apt-get install podman runc debootstrap), root.
set -euo pipefail
IMAGE="${1:-localhost/bookworm-base}"
ROOTFS="${2:-/tmp/bookworm-rootfs}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=docker/podman-env.sh
. "$here/podman-env.sh"

if [ ! -x "$ROOTFS/usr/bin/python3" ]; then
    rm -rf "$ROOTFS"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$ROOTFS" "$MIRROR"
    # Keep the image small: package lists and apt caches are not needed in a base.
    rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb
fi
tar -C "$ROOTFS" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' - "$IMAGE"
podman image ls "$IMAGE"
