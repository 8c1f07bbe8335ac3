#!/bin/sh
# First boot step (run once by init): mount, load modules, configure the network
# from the kernel command line (meshcloud.ip=A.B.C.D/N meshcloud.gw=A.B.C.D
# meshcloud.name=NAME meshcloud.port=P meshcloud.write_mbps=N), see docs/appliance.md.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /run /tmp /var/run
while read -r module; do
    insmod "/lib/modules/$module" || echo "rc: cannot load $module"
done < /lib/modules/load-order

NAME=appliance IP= GW= PORT=80 WRITE_MBPS=0 DISK=/dev/vda
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        meshcloud.name=*) NAME="${arg#*=}" ;;
        meshcloud.ip=*) IP="${arg#*=}" ;;
        meshcloud.gw=*) GW="${arg#*=}" ;;
        meshcloud.port=*) PORT="${arg#*=}" ;;
        meshcloud.write_mbps=*) WRITE_MBPS="${arg#*=}" ;;
        meshcloud.disk=*) DISK="/dev/${arg#*=}" ;;
    esac
done
hostname "$NAME"
ip link set lo up
IFACE=
for dev in /sys/class/net/*; do
    dev="${dev##*/}"
    [ "$dev" = lo ] && continue
    IFACE="$dev"
    break
done
if [ -n "$IFACE" ]; then
    ip link set "$IFACE" up
    [ -n "$IP" ] && ip addr add "$IP" dev "$IFACE"
    [ -n "$GW" ] && ip route add default via "$GW" dev "$IFACE"
    # Tell the segment where this address now lives (it may have moved racks).
    [ -n "$IP" ] && arping -U -c 1 -I "$IFACE" "${IP%/*}" >/dev/null 2>&1 &
else
    echo "rc: no network interface found"
fi
cat > /run/appliance.env <<END
NAME='$NAME'
IP='$IP'
PORT='$PORT'
WRITE_MBPS='$WRITE_MBPS'
DISK='$DISK'
END
echo "rc: $NAME up on ${IFACE:-no interface} ${IP:-without address}"
