#!/bin/sh
# noatime-run.sh TREE COMMAND...: run COMMAND while TREE is bind-mounted onto
# itself with noatime, so that reading the tree (mkfs.ext4 -d) does not change
# the access times it copies into the image. Called under
# `unshare --mount --propagation private`: the mount vanishes with it.
set -eu
tree=$1
shift
mount --bind "$tree" "$tree"
mount -o remount,bind,noatime "$tree"
exec "$@"
