#!/bin/sh
# mmdebstrap setup hook: runs before any package is installed; $1 is the new root.
# Makes the initramfs small and quick to unpack, and keeps documentation out.
set -eu
root=$1
mkdir -p "$root/etc/initramfs-tools/conf.d" "$root/etc/dpkg/dpkg.cfg.d"
printf 'COMPRESS=zstd\n' >"$root/etc/initramfs-tools/conf.d/meshcloud.conf"
cat >"$root/etc/dpkg/dpkg.cfg.d/01-meshcloud-nodoc" <<'CFG'
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
CFG
