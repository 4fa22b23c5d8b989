# Source this before running podman on a machine like this one:  . docker/podman-env.sh
# (runc + cgroupfs + fixed ulimits in containers.conf; overlay storage under /var/tmp).
_here="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")" && pwd)"
export CONTAINERS_CONF="$_here/containers.conf"
export CONTAINERS_STORAGE_CONF="$_here/storage.conf"
unset _here
