#!/bin/sh
# chroot-run.sh ROOT COMMAND...: run COMMAND inside the image tree ROOT with
# /proc, /sys and /dev mounted. `meshcloud image build` calls it under
# `unshare --mount --propagation private`, so these mounts live in a private
# mount namespace and disappear with it, even if the build is killed.
set -eu
root=$1
shift
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --rbind /dev "$root/dev"
exec chroot "$root" "$@"
