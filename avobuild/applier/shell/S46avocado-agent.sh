#!/bin/sh
# /etc/init.d/S46avocado-agent: busybox-init integration of the update agent (installed by
# `avobuild applier render` when the recipe has a [fleet] table). `start` runs
# `avocado-update agent` in the background, started again 60 s after it exits; `stop` ends
# the loop and the agent (the loop's pid is kept in /run/avocado-agent.pid).
PIDFILE=/run/avocado-agent.pid
case "${1:-start}" in
start)
    (
        child=
        trap '[ -z "$child" ] || kill "$child" 2> /dev/null; exit 0' TERM
        while :; do
            /usr/sbin/avocado-update agent &
            child=$!
            wait "$child"
            sleep 60 &
            child=$!
            wait "$child"
        done
    ) > /dev/console 2>&1 < /dev/null &
    echo $! > "$PIDFILE"
    ;;
stop)
    [ ! -f "$PIDFILE" ] || kill "$(cat "$PIDFILE")" 2> /dev/null
    rm -f "$PIDFILE"
    ;;
status) /usr/sbin/avocado-update status ;;
*) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
