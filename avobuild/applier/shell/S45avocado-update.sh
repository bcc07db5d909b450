#!/bin/sh
# /etc/init.d/S45avocado-update: busybox-init integration of avocado-update (installed by
# `avobuild applier render`). `start` records which slot booted, then runs the health check
# of an unconfirmed slot in the background (it confirms, or rolls back and reboots).
case "${1:-start}" in
start)
    /usr/sbin/avocado-update boot
    ( sleep 5; /usr/sbin/avocado-update health-check ) > /dev/console 2>&1 < /dev/null &
    ;;
stop) ;;
status) /usr/sbin/avocado-update status ;;
*) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
