#!/bin/sh
# avobuild recovery: first process of the recovery initramfs (busybox sh).
# Mounts the kernel filesystems, loads the drivers listed in /lib/modules/load-order, finds
# the recovery medium (USB) or brings up the network (PXE), then hands over to busybox init,
# which runs the recovery menu on the serial console and on the screen (/etc/inittab).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
umask 022

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /run /tmp
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs tmpfs /tmp
hostname avobuild-recovery

# Settings of the product (rendered at build time), then the kernel command line's avo.*
# parameters, which win. /run/avobuild-boot.conf is sourced by avocado-recovery, so only
# values of the expected shape reach it.
# shellcheck source=/dev/null
. /etc/avobuild/recovery.conf
AVO_SERVER='' AVO_AUTORUN=''
set -f
read -r cmdline < /proc/cmdline
for parameter in $cmdline; do
    case "$parameter" in
        avo.mode=partition | avo.mode=usb | avo.mode=net) AVO_MODE=${parameter#avo.mode=} ;;
        avo.server=*[!A-Za-z0-9._~:/?=%+@,-]*) echo "avobuild recovery: ignoring avo.server (unexpected characters)" ;;
        avo.server=http://* | avo.server=https://*) AVO_SERVER=${parameter#avo.server=} ;;
        avo.autorun=restore | avo.autorun=repair | avo.autorun=diagnose) AVO_AUTORUN=${parameter#avo.autorun=} ;;
    esac
done
set +f
{
    echo "AVO_MODE='$AVO_MODE'"
    echo "AVO_SERVER='$AVO_SERVER'"
    echo "AVO_AUTORUN='$AVO_AUTORUN'"
} > /run/avobuild-boot.conf

echo "avobuild recovery: loading drivers"
if [ -f /lib/modules/load-order ]; then
    while read -r module; do
        insmod "/lib/modules/$module" 2>/dev/null
    done < /lib/modules/load-order
fi

case "$AVO_MODE" in
    usb) /usr/sbin/avocado-recovery find-medium ;;
    net) /usr/sbin/avocado-recovery network-up ;;
esac

# A per-device network boot entry may start an action at once (e.g. a remote factory
# restore); the menu follows either way.
case "$AVO_AUTORUN" in
    restore|repair|diagnose) /usr/sbin/avocado-recovery "$AVO_AUTORUN" --yes ;;
esac

exec /sbin/init
