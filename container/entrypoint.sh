#!/bin/sh
# The tool image's entrypoint: `estargz ARGS`, after one adjustment for
# `estargz optimize` as root.
#
# Docker and Kubernetes mount the container's own cgroups read-only, even
# with CAP_SYS_ADMIN; runc, which optimize runs the workload with, must
# create the workload's cgroup below them.  With CAP_SYS_ADMIN the
# container may remount its own cgroup mounts read-write (they show only the
# container's subtree: the workload's cgroup nests inside the container's
# limits).  Without it (the usual case, and every rootless run) the remount
# fails and nothing changes: rootless profiling needs no cgroups.
set -eu
if [ "$(id -u)" = 0 ]; then
    # mountinfo: field 5 the mount point, 6 its options; after "-" the type.
    awk '{ for (i = 7; $i != "-"; i++) ;
           if ($(i + 1) ~ /^cgroup2?$/ && $6 ~ /(^|,)ro(,|$)/) print $5 }' \
        /proc/self/mountinfo |
    while IFS= read -r m; do
        mount -o remount,bind,rw "$m" 2>/dev/null || true
    done
fi
exec estargz "$@"
