# --- avocado-update: health check, rollback.yaml, pre-check, reporting (applier/shell/health.sh)

service_running() {
    if [ "$INIT_SYSTEM" = systemd ] && command -v systemctl > /dev/null 2>&1; then
        systemctl is-active --quiet "$1"
    else
        pidof "$1" > /dev/null 2>&1
    fi
}

cmd_pre_check() {
    parse_common "$@"
    failed=0
    mkdir -p "$STATE_DIR"
    free_kb=$(df -Pk "$STATE_DIR" | awk 'NR == 2 { print $4 }')
    is_number "$free_kb" || free_kb=0
    if [ "$free_kb" -ge "$MIN_FREE_KB" ]; then
        echo "ok Disk space: $((free_kb / 1024))MB available ($((MIN_FREE_KB / 1024))MB required)"
    else
        echo "FAIL Disk space: $((free_kb / 1024))MB available ($((MIN_FREE_KB / 1024))MB required)"; failed=1
    fi
    power=none ac=0 battery=
    for supply in "$SYS"/class/power_supply/*; do
        [ -f "$supply/type" ] || continue
        case $(cat "$supply/type") in
        Mains | USB) [ "$(cat "$supply/online" 2>/dev/null)" = 1 ] && ac=1; power=found ;;
        Battery)
            battery=$(cat "$supply/capacity" 2> /dev/null)
            is_number "$battery" 100 || battery=''
            power=found ;;
        esac
    done
    if [ "$power" = none ]; then echo "ok Power: no battery (mains powered)"
    elif [ "$ac" = 1 ]; then echo "ok Power: AC connected${battery:+, battery $battery%}"
    elif [ -n "$battery" ] && [ "$battery" -ge "$MIN_BATTERY" ]; then echo "ok Battery: $battery%"
    else echo "FAIL Battery: ${battery:-unknown}% and no AC (at least $MIN_BATTERY% needed)"; failed=1; fi
    up=
    for iface in "$SYS"/class/net/*; do
        [ -f "$iface/operstate" ] || continue
        [ "${iface##*/}" = lo ] && continue
        [ "$(cat "$iface/operstate")" = up ] && up="$up ${iface##*/}"
    done
    if [ -n "$up" ]; then echo "ok Network: connected ($(clean "$up") )"; else echo "FAIL Network: no interface is up"; failed=1; fi
    flatten_rollback
    down=
    for service in $(cfg_list service_health.critical_services); do
        service_running "$service" || down="$down $service"
    done
    if [ -z "$down" ]; then echo "ok System health: all critical services running"
    else echo "FAIL System health: not running:$down"; failed=1; fi
    # shellcheck disable=SC2012  # names the applier made (make_backup): no odd characters
    latest=$(ls -t "$STATE_DIR"/backups/*.tar 2> /dev/null | head -n 1)
    if [ -n "$latest" ]; then echo "ok Backup: $(clean "$latest")"
    else echo "note Backup: none yet (avocado-update backup)"; fi
    [ "$failed" = 0 ] || exit 1
}

# --- rollback.yaml: flattened to trigger.key=value lines by a small awk reader ---------------
flatten_rollback() {
    [ -f "$WORK/rollback.conf" ] && return 0
    [ -f "$ROLLBACK_YAML" ] || { : > "$WORK/rollback.conf"; return 0; }
    yaml_flatten | sed 's/^rollback\.triggers\.//' > "$WORK/rollback.conf"
}
# yaml_flatten: the YAML file ROLLBACK_YAML names as path.key=value lines (lists: path.N=).
yaml_flatten() {
    awk '
    function path(depth,   i, p) { p = ""; for (i = 1; i <= depth; i++) p = p (p == "" ? "" : ".") key[i]; return p }
    {
        sub(/[ \t]+#.*$/, "")
        if ($0 ~ /^[ \t]*(#.*)?$/) next
        match($0, /^ */); indent = RLENGTH; line = substr($0, indent + 1)
        while (depth > 0 && level[depth] >= indent) depth--
        if (line ~ /^- /) {
            parent = path(depth); item = count[parent]++
            line = substr(line, 3)
            if (line !~ /^[A-Za-z_][A-Za-z0-9_]*:( |$)/) { gsub(/^["\x27]|["\x27]$/, "", line); print parent "." item "=" line; next }
            depth++; level[depth] = indent; key[depth] = item; indent += 2
        }
        name = line; sub(/:.*/, "", name)
        value = line; sub(/^[^:]*:[ ]*/, "", value); gsub(/^["\x27]|["\x27]$/, "", value)
        if (value == "") { depth++; level[depth] = indent; key[depth] = name }
        else print path(depth) "." name "=" value
    }' "$ROLLBACK_YAML"
}
cfg() { value=$(sed -n "s/^$1=//p" "$WORK/rollback.conf" | head -n 1); echo "${value:-$2}"; }
cfg_list() { sed -n "s/^$1\.[0-9]*=//p" "$WORK/rollback.conf"; }
# seconds DURATION: "30s", "5m", "1h" or "30" in seconds; 0 for anything else (the recipe
# wrote these, but an operator may edit rollback.yaml on the device).
seconds() {
    case $1 in
    *h) _sc_unit=3600 _sc_number=${1%h} ;;
    *m) _sc_unit=60 _sc_number=${1%m} ;;
    *s) _sc_unit=1 _sc_number=${1%s} ;;
    *) _sc_unit=1 _sc_number=$1 ;;
    esac
    if is_number "$_sc_number" 99999999; then echo $((_sc_number * _sc_unit)); else echo 0; fi
}
# count_of TEXT DEFAULT: TEXT when it is a number (at most 10^9), else DEFAULT.
count_of() { if is_number "$1" 1000000000; then echo "$1"; else echo "$2"; fi; }

metric_value() {
    case $1 in
    memory_usage)
        awk '/^MemTotal:/ { total = $2 } /^MemAvailable:/ { avail = $2 }
             END { if (total > 0) print int((total - avail) * 100 / total); else print 0 }' "$PROC/meminfo" ;;
    cpu_temperature)
        hottest=
        for zone in "$SYS"/class/thermal/thermal_zone*/temp; do
            [ -f "$zone" ] || continue
            millicelsius=$(cat "$zone")
            is_number "$millicelsius" 1000000000 || continue
            celsius=$((millicelsius / 1000))
            [ -n "$hottest" ] && [ "$hottest" -ge "$celsius" ] || hottest=$celsius
        done
        echo "${hottest:-0}" ;;
    esac
}

# A metric fails when it stays at or above its threshold for its whole duration.
check_metric() {
    metric=$1 threshold=$2 duration=$3 interval=$4
    [ "$interval" -le "$duration" ] || interval=$duration
    [ "$interval" -ge 1 ] || interval=1
    waited=0
    while :; do
        value=$(metric_value "$metric")
        [ "$value" -ge "$threshold" ] || return 0
        [ "$waited" -lt "$duration" ] || { health_reason="system_metrics: $metric at $value, threshold $threshold held for ${duration}s"; return 1; }
        sleep "$interval"
        waited=$((waited + interval))
    done
}

run_health_checks() {
    flatten_rollback
    interval=$(seconds "$(cfg service_health.check_interval 30s)")
    if [ "$(cfg service_health.enabled true)" = true ]; then
        threshold=$(count_of "$(cfg service_health.failure_threshold 2)" 2)
        for service in $(cfg_list service_health.critical_services); do
            failures=0
            while ! service_running "$service"; do
                failures=$((failures + 1))
                [ "$failures" -lt "$threshold" ] || { health_reason="service_health: $service not running after $failures checks"; return 1; }
                sleep "$interval"
            done
        done
    fi
    if [ "$(cfg system_metrics.enabled true)" = true ]; then
        item=0
        while metric=$(cfg "system_metrics.conditions.$item.metric" ""); [ -n "$metric" ]; do
            threshold=$(count_of "$(cfg "system_metrics.conditions.$item.threshold" 100 | tr -d '%C')" 100)
            duration=$(seconds "$(cfg "system_metrics.conditions.$item.duration" 60s)")
            check_metric "$metric" "$threshold" "$duration" "$interval" || return 1
            item=$((item + 1))
        done
    fi
    if [ "$(cfg app_validation.enabled false)" = true ]; then
        script=$(cfg app_validation.script /usr/local/bin/validate-system)
        limit=$(seconds "$(cfg app_validation.timeout 60s)")
        timeout "$limit" "$script" > "$WORK/validation.log" 2>&1 \
            || { health_reason="app_validation: $script failed or exceeded ${limit}s"; return 1; }
    fi
    for hook in "$CONF_DIR"/post-update.d/*; do
        [ -x "$hook" ] || continue
        "$hook" > "$WORK/hook.log" 2>&1 || { health_reason="post-update hook $hook failed"; return 1; }
    done
}

# Run by the health-check unit (or the init script) after booting an unconfirmed slot.
cmd_health_check() {
    parse_common "$@"
    benv_load
    booted=$(booted_slot)
    if [ "$(slot_var "$booted" ok)" = 1 ]; then
        echo "slot $booted is confirmed; nothing to check"
        return 0
    fi
    flatten_rollback
    started=$(date +%s)
    limit=$(seconds "$(cfg boot_failure.timeout 120s)")
    health_reason=
    if run_health_checks; then
        if [ "$(cfg boot_failure.enabled true)" = true ] && [ $(($(date +%s) - started)) -gt "$limit" ]; then
            health_reason="boot_failure: not healthy within the ${limit}s timeout"
        fi
    fi
    if [ -z "$health_reason" ]; then
        record health ok "slot=$booted"
        telemetry_event validation "$(slot_var "$booted" version)" ok
        cmd_confirm
        return 0
    fi
    log "health check failed: $health_reason"
    telemetry_event validation "$(slot_var "$booted" version)" failed "\"detail\":$(json_string "$health_reason")"
    do_rollback "$health_reason"
    echo "rolled back: $health_reason"
    reboot_now
    return 1
}

# The history, older entries (history.1, see record) first.
history_lines() {
    for _hl_file in "$HISTORY.1" "$HISTORY"; do
        [ ! -f "$_hl_file" ] || cat "$_hl_file"
    done
}

cmd_history() {
    parse_common "$@"
    [ -f "$HISTORY" ] || [ -f "$HISTORY.1" ] || { echo "no updates recorded"; return 0; }
    if [ "$VERBOSE" = 1 ] || [ "$format" = detailed ]; then
        history_lines | LC_ALL=C tr -c '\t\n -~' '?'
    else
        history_lines | grep -v '	state	' | LC_ALL=C tr -c '\t\n -~' '?' || true
    fi
}

# report --format json: always valid JSON; every string is cleaned (lib.sh: clean) and escaped,
# whatever the state, the history or the boot state hold.
cmd_report() {
    parse_common "$@"
    [ "$format" = json ] || usage "report --format json"
    benv_load
    booted=$(booted_slot)
    printf '{"compatible":%s,"booted":%s,"primary":%s,"state":%s,' \
        "$(json_string "$avo_compatible")" "$(json_string "$booted")" "$(json_string "$avo_primary")" \
        "$(json_string "$(state_get state)")"
    printf '"slots":{'
    for slot in A B; do
        [ "$slot" = A ] || printf ','
        tries=$(slot_var "$slot" tries)
        is_number "$tries" || tries=null
        printf '"%s":{"version":%s,"ok":%s,"tries":%s}' "$slot" "$(json_string "$(slot_var "$slot" version)")" \
            "$([ "$(slot_var "$slot" ok)" = 1 ] && echo true || echo false)" "$tries"
    done
    printf '},"events":['
    history_lines | LC_ALL=C awk -F '\t' -v from="$from" -v to="$to" '
        function esc(s) {
            s = substr(s, 1, 1024); gsub(/[^ -~]/, "?", s)
            gsub(/\\/, "\\\\", s); gsub(/"/, "\\\"", s); return "\"" s "\""
        }
        (from == "current" || substr($1, 1, 10) >= from) && (to == "previous" || substr($1, 1, 10) <= to) {
            printf "%s{\"time\":%s,\"event\":%s,\"detail\":%s}", (n++ ? "," : ""), esc($1), esc($2), esc($3)
        }'
    printf ']}\n'
}

cmd_monitor() {
    parse_common "$@"
    last=
    while :; do
        line="$(state_get state) since $(state_get since)"
        if [ "$line" != "$last" ]; then
            echo "$(now) state $line"
            last=$line
        fi
        [ "$follow" = 1 ] || return 0
        sleep "${AVO_MONITOR_INTERVAL:-1}"
    done
}

