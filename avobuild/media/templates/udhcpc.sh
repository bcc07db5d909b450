#!/bin/sh
# udhcpc event script of the recovery system: configure the interface from the lease.
# shellcheck disable=SC2154  # udhcpc passes interface, ip, mask, router and dns
case "$1" in
    deconfig)
        ip -4 addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound|renew)
        ip -4 addr flush dev "$interface"
        ip -4 addr add "$ip/${mask:-24}" dev "$interface"
        for gateway in $router; do
            ip -4 route add default via "$gateway" dev "$interface"
            break
        done
        : > /etc/resolv.conf
        for server in $dns; do
            echo "nameserver $server" >> /etc/resolv.conf
        done
        ;;
esac
exit 0
