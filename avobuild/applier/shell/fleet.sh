# --- avocado-update: the update agent (applier/shell/fleet.sh) ----------------------------------
# check, download --version, agent: the device asks its fleet server (or reads a static
# repository) for updates over mutual TLS, believes nothing the signed index does not say
# (docs/repository-format.md), and reports telemetry events (update-telemetry.yaml). The
# HTTPS client is `openssl s_client` behind the strict reader http_request: busybox wget has
# no client certificates, and openssl is on every device already (docs/applier.md).
FLEET_DIR=$STATE_DIR/fleet
# The agent's files on the data partition, when provisioning wrote them, else the image's.
if [ -z "$AGENT_CONF" ]; then
    AGENT_CONF=$CONF_DIR/agent.conf
    [ ! -f "$DATA_MOUNT/avocado/agent.conf" ] || AGENT_CONF=$DATA_MOUNT/avocado/agent.conf
fi
if [ -z "$TELEMETRY_YAML" ]; then
    TELEMETRY_YAML=$CONF_DIR/update-telemetry.yaml
    [ ! -f "$DATA_MOUNT/avocado/update-telemetry.yaml" ] || TELEMETRY_YAML=$DATA_MOUNT/avocado/update-telemetry.yaml
fi
TELEMETRY_DIR=$STATE_DIR/telemetry
CR=$(printf '\r')
MAX_INDEX_REGION=1048576
TELEMETRY_BATCH=40
# The longest wait a server's Retry-After may impose (a longer one is cut to this).
MAX_RETRY_AFTER=86400

# fleet_note EVENT TEXT: a history entry and the agent's status file (what the last pass did).
fleet_note() {
    mkdir -p "$FLEET_DIR" 2> /dev/null
    record "$1" "$2"
    printf 'time=%s\nresult=%s\ndetail=%s\n' "$(clock)" "$1" "$(clean "$2" "$MAX_ENTRY")" \
        | atomic_write "$FLEET_DIR/status" 2> /dev/null
}

# fleet_failed TEXT: history, status and an error event for a refusal (bundle.sh's
# set_state_failed calls it while FLEET_REFUSE=1, for the index's signature check).
fleet_failed() {
    fleet_note refused "$*"
    telemetry_event error "${running_version:-unknown}" failed "\"detail\":$(json_string "$*")"
    telemetry_send_if_urgent
}

# fleet_refuse CODE TEXT: a refusal of the agent: history, status, an error event, exit CODE.
# Nothing of the update state changes: a refused index or download never touches a slot.
fleet_refuse() {
    _fr_code=$1
    shift
    fleet_failed "$*"
    die "$_fr_code" "refused: $*"
}

# decimal DIGITS: the number without leading zeros ($(( )) reads 010 as octal).
decimal() {
    _dc_value=${1#"${1%%[!0]*}"}
    echo "${_dc_value:-0}"
}

# --- configuration ---------------------------------------------------------------------------
# ini_flatten FILE: "Section.Key=value" per line of an INI file (comments and blanks skipped).
ini_flatten() {
    awk '
    { sub(/\r$/, "") }
    /^[ \t]*([#;].*)?$/ { next }
    /^\[[A-Za-z]+\][ \t]*$/ { section = $0; gsub(/[][ \t]/, "", section); next }
    {
        name = $0; sub(/[ \t]*=.*/, "", name); sub(/^[ \t]*/, "", name)
        value = $0; if (sub(/^[^=]*=[ \t]*/, "", value) == 0) next
        sub(/[ \t]+$/, "", value)
        if (name ~ /^[A-Za-z]+$/ && !((section "." name) in seen)) { seen[section "." name] = 1; print section "." name "=" value }
    }' "$1"
}
ac() { sed -n "s/^$1=//p" "$WORK/agent.flat" | head -n 1; }
tc() { sed -n "s/^metrics\.$1=//p" "$WORK/telemetry.flat" | head -n 1; }

# agent_conf_load: read agent.conf and check every value it gives (an operator may edit it).
agent_conf_load() {
    [ -f "$AGENT_CONF" ] || die 2 "$AGENT_CONF: no agent configuration (the recipe has no [fleet] table)"
    ini_flatten "$AGENT_CONF" > "$WORK/agent.flat"
    fleet_product=$(ac Fleet.Product)
    is_name identifier "$fleet_product" || die 2 "$AGENT_CONF: [Fleet] Product '$fleet_product' is not a repository name"
    fleet_cohort=$(ac Fleet.Cohort)
    case $fleet_cohort in "" | [!a-z0-9]* | ?*[!a-z0-9_-]*) die 2 "$AGENT_CONF: [Fleet] Cohort '$fleet_cohort' is not a channel name" ;; esac
    [ "${#fleet_cohort}" -le 32 ] || die 2 "$AGENT_CONF: [Fleet] Cohort: at most 32 characters"
    fleet_mode=$(ac Fleet.Mode)
    case ${fleet_mode:=server} in server | static) ;; *) die 2 "$AGENT_CONF: [Fleet] Mode must be server or static" ;; esac
    endpoint_parse "$(ac Connection.Endpoint)" || die 2 "$AGENT_CONF: [Connection] Endpoint '$(ac Connection.Endpoint)' is not https://HOST[:PORT][/PREFIX]"
    fleet_host=$ep_host fleet_port=$ep_port fleet_prefix=$ep_prefix
    http_to fleet
    fleet_certificate=$(ac Connection.Certificate)
    fleet_key=$(ac Connection.Key)
    fleet_ca=$(ac Connection.ServerCA)
    INDEX_KEYS=$(ac Connection.IndexKeys)
    for _al_file in "$fleet_certificate" "$fleet_key" "$fleet_ca"; do
        [ -f "$_al_file" ] || die 1 "$AGENT_CONF: [Connection]: $_al_file: no such file (device certificate, key and server CA)"
    done
    [ -d "$INDEX_KEYS" ] || die 1 "$AGENT_CONF: [Connection] IndexKeys: $INDEX_KEYS is not a directory"
    INDEX_THRESHOLD=$(ac Connection.IndexThreshold)
    is_number "$INDEX_THRESHOLD" 64 && [ "$INDEX_THRESHOLD" -ge 1 ] || die 2 "$AGENT_CONF: [Connection] IndexThreshold must be 1 to 64"
    fleet_timeout=$(count_of "$(ac Connection.Timeout)" 600)
    check_interval=$(count_of "$(ac Updates.CheckInterval)" 3600)
    [ "$check_interval" -ge 1 ] || check_interval=3600
    random_delay=$(count_of "$(ac Updates.RandomDelay)" 300)
    auto_download=$(ac Updates.AutoDownload)
    auto_apply=$(ac Updates.AutoApply)
    for _al_flag in "$auto_download" "$auto_apply"; do
        case $_al_flag in true | false) ;; *) die 2 "$AGENT_CONF: [Updates] AutoDownload and AutoApply must be true or false" ;; esac
    done
    update_window=$(ac Updates.UpdateWindow)
    [ -z "$update_window" ] || window_minutes "$update_window" > /dev/null \
        || die 2 "$AGENT_CONF: [Updates] UpdateWindow '$update_window' is not HH:MM-HH:MM"
    device_id=$(openssl x509 -in "$fleet_certificate" -noout -subject -nameopt RFC2253 2> /dev/null \
        | sed -n 's/^subject=//p' | tr ',' '\n' | sed -n 's/^CN=//p' | head -n 1)
    case $device_id in "" | [!A-Za-z0-9]* | ?*[!A-Za-z0-9._-]*) die 1 "$fleet_certificate: no device id (CN of [A-Za-z0-9._-]) in the certificate" ;; esac
    [ "${#device_id}" -le 64 ] || die 1 "$fleet_certificate: the device id is longer than 64 characters"
}

# endpoint_parse URL: sets ep_host, ep_port and ep_prefix.
endpoint_parse() {
    case $1 in https://?*) ;; *) return 1 ;; esac
    _ep_rest=${1#https://}
    _ep_hostport=${_ep_rest%%/*}
    ep_prefix=
    [ "$_ep_hostport" = "$_ep_rest" ] || ep_prefix=/${_ep_rest#*/}
    ep_prefix=${ep_prefix%/}
    case $ep_prefix in *[!A-Za-z0-9._~/-]* | *//* | *..*) return 1 ;; esac
    ep_host=${_ep_hostport%:*}
    ep_port=443
    [ "$ep_host" = "$_ep_hostport" ] || ep_port=${_ep_hostport##*:}
    is_number "$ep_port" 65535 && [ "$ep_port" -ge 1 ] || return 1
    case $ep_host in "" | -* | *[!A-Za-z0-9.-]*) return 1 ;; esac
}

# http_to fleet|telemetry: where the next requests go (http_host, http_port, http_prefix).
# Events go to update-telemetry.yaml's metrics.endpoint when it names one, with the same
# device certificate, key and ServerCA; otherwise to [Connection] Endpoint.
http_to() {
    if [ "$1" = telemetry ] && [ -n "${telemetry_host:-}" ]; then
        http_host=$telemetry_host http_port=$telemetry_port http_prefix=$telemetry_prefix
    else
        http_host=$fleet_host http_port=$fleet_port http_prefix=$fleet_prefix
    fi
}

# telemetry_load: telemetry_on (1 or 0), what it collects, interval, on_failure, max_queue,
# the endpoint (telemetry_host, _port, _prefix; empty: the fleet endpoint). A bad endpoint
# sets telemetry_bad: events are still queued, nothing is sent, check and agent refuse to run.
telemetry_load() {
    telemetry_on=0 telemetry_host='' telemetry_bad=''
    [ -f "$TELEMETRY_YAML" ] || return 0
    _tl_saved=$ROLLBACK_YAML
    ROLLBACK_YAML=$TELEMETRY_YAML
    yaml_flatten > "$WORK/telemetry.flat"
    ROLLBACK_YAML=$_tl_saved
    [ "$(tc enabled)" = true ] || return 0
    telemetry_on=1
    telemetry_collect=" $(sed -n 's/^metrics\.collect\.[0-9]*=//p' "$WORK/telemetry.flat" | tr '\n' ' ')"
    telemetry_interval=$(count_of "$(tc reporting.interval_seconds)" 86400)
    telemetry_on_failure=$(tc reporting.on_failure)
    telemetry_max=$(count_of "$(tc reporting.max_queue)" 262144)
    _tl_endpoint=$(tc endpoint)
    [ -n "$_tl_endpoint" ] || return 0
    if endpoint_parse "$_tl_endpoint"; then
        telemetry_host=$ep_host telemetry_port=$ep_port telemetry_prefix=$ep_prefix
    else
        telemetry_bad="$TELEMETRY_YAML: metrics.endpoint '$(clean "$_tl_endpoint" 200)' is not https://HOST[:PORT][/PREFIX]"
    fi
}

# telemetry_usable: die 2 on a bad telemetry endpoint (check, download and agent say so).
telemetry_usable() { [ -z "${telemetry_bad:-}" ] || die 2 "$telemetry_bad"; }

# --- the HTTPS client ------------------------------------------------------------------------
# http_request METHOD PATH OUT MAX [START [ETAG]] [BODY-FILE]: one request over mutual TLS
# to http_host:http_port (http_to). The body is written to OUT (appended from byte START on a
# 206 answer to a range request; a 200 answer restarts OUT); an error answer's first 4 KiB go
# to $WORK/http.error. Sets http_status, http_got (body bytes read) and http_backoff (1: the
# server asked this device to wait). Status 0: a 2xx answer, complete; 2: another status;
# 3: not HTTP as this client reads it (chunked, no length, bad range); 4: truncated; 5: no
# TLS connection (openssl's reason in $WORK/tls.err); 6: longer than MAX bytes; 7: not sent,
# the endpoint's Retry-After has not passed (backoff_left). openssl's exit status says
# nothing about completeness: Content-Length decides.
http_request() {
    _hr_method=$1 _hr_path=$2 _hr_out=$3 _hr_max=$4 _hr_start=${5:-0} _hr_etag=${6:-}
    _hr_body=${7:-}
    http_status=0 http_got=0 http_backoff=0
    http_wait=$(backoff_left)
    if [ "$http_wait" -gt 0 ]; then
        http_backoff=1
        return 7
    fi
    {
        printf '%s %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: avocado-update/%s\r\n' \
            "$_hr_method" "$_hr_path" "$http_host" "$APPLIER_VERSION"
        printf 'Accept: text/plain, application/json\r\nAccept-Encoding: identity\r\nConnection: close\r\n'
        if [ "$_hr_start" -gt 0 ]; then
            printf 'Range: bytes=%s-\r\n' "$_hr_start"
            [ -z "$_hr_etag" ] || printf 'If-Range: "%s"\r\n' "$_hr_etag"
        fi
        if [ -n "$_hr_body" ]; then
            printf 'Content-Type: application/json\r\nContent-Length: %s\r\n' "$(size_of "$_hr_body")"
        fi
        printf '\r\n'
        [ -z "$_hr_body" ] || cat "$_hr_body"
    } > "$WORK/http.request"
    case $http_host in
    *[!0-9.]*) set -- -servername "$http_host" -verify_hostname "$http_host" ;;
    *) set -- -noservername -verify_ip "$http_host" ;;
    esac
    rm -f "$WORK/http.result" "$WORK/http.retry"
    timeout "$fleet_timeout" openssl s_client -quiet -nocommands -connect "$http_host:$http_port" \
        "$@" -verify_return_error -CAfile "$fleet_ca" -no-CApath -no-CAstore \
        -cert "$fleet_certificate" -key "$fleet_key" < "$WORK/http.request" 2> "$WORK/tls.err" \
        | http_read "$_hr_out" "$_hr_max" "$_hr_start"
    _hr_code=5
    [ ! -f "$WORK/http.result" ] || read -r _hr_code http_status http_got < "$WORK/http.result"
    case $_hr_code.$http_status in 2.429 | 2.503) backoff_from_answer ;; esac
    return "$_hr_code"
}

# http_read OUT MAX START: the response on stdin; the verdict "CODE STATUS BYTES" in
# $WORK/http.result (a pipeline's last part runs in a subshell: variables do not come back).
http_read() {
    _rd_result() { echo "$1 ${_rd_status:-0} ${_rd_got:-0}" > "$WORK/http.result"; exit 0; }
    IFS= read -r _rd_line || { [ ! -s "$WORK/tls.err" ] || _rd_result 5; _rd_result 5; }
    _rd_line=${_rd_line%"$CR"}
    case $_rd_line in "HTTP/1."[01]" "[1-5][0-9][0-9] | "HTTP/1."[01]" "[1-5][0-9][0-9]" "*) ;; *) _rd_result 3 ;; esac
    _rd_status=${_rd_line#HTTP/1.? }
    _rd_status=${_rd_status%% *}
    _rd_length='' _rd_range='' _rd_coding='' _rd_count=0 _rd_ended=0
    while IFS= read -r _rd_line; do
        _rd_line=${_rd_line%"$CR"}
        [ -n "$_rd_line" ] || { _rd_ended=1; break; }
        _rd_count=$((_rd_count + 1))
        [ "$_rd_count" -le 100 ] && [ "${#_rd_line}" -le 8192 ] || _rd_result 3
        _rd_name=$(printf '%s' "${_rd_line%%:*}" | tr '[:upper:]' '[:lower:]')
        _rd_value=${_rd_line#*:}
        _rd_value=${_rd_value# }
        case $_rd_name in
        content-length) [ -z "$_rd_length" ] || _rd_result 3; _rd_length=$_rd_value ;;
        content-range) _rd_range=$_rd_value ;;
        transfer-encoding) _rd_coding=$_rd_value ;;
        retry-after) clean "$_rd_value" 64 > "$WORK/http.retry" ;;
        esac
    done
    [ "$_rd_ended" = 1 ] || _rd_result 4
    [ -z "$_rd_coding" ] && is_number "$_rd_length" || _rd_result 3
    case $_rd_status in
    2??) ;;
    *)
        take "$((_rd_length < 4096 ? _rd_length : 4096))" > "$WORK/http.error"
        _rd_got=$(size_of "$WORK/http.error")
        _rd_result 2 ;;
    esac
    if [ "$_rd_status" = 206 ]; then
        [ "$_rd_length" -ge 1 ] && [ "$_rd_range" = "bytes $3-$(($3 + _rd_length - 1))/$(($3 + $2))" ] \
            || _rd_result 3
        [ "$_rd_length" -le "$2" ] || _rd_result 6
        take "$_rd_length" >> "$1" || _rd_result 4
    else
        [ "$_rd_length" -le "$(($3 + $2))" ] || _rd_result 6
        take "$_rd_length" > "$1" || _rd_result 4
    fi
    _rd_got=$_rd_length
    [ "$(size_of "$1")" -eq $(($3 * (_rd_status == 206) + _rd_length)) ] || { _rd_got=0; _rd_result 4; }
    _rd_result 0
}

# http_why CODE: what went wrong, for messages.
http_why() {
    case $1 in
    2)
        printf 'HTTP %s: %s' "$http_status" "$(clean "$(cat "$WORK/http.error" 2> /dev/null)" 300)"
        [ "$http_backoff" = 0 ] || printf '; no request to %s:%s for %s s (Retry-After)' "$http_host" "$http_port" "$http_wait"
        echo ;;
    3) echo "not an HTTP answer this client reads (chunked, no Content-Length or a wrong range)" ;;
    4) echo "the connection ended early (truncated answer)" ;;
    5) echo "no TLS connection to $http_host:$http_port: $(clean "$(grep -v '^Connecting' "$WORK/tls.err" | head -n 3 | tr '\n' ' ')" 300)" ;;
    6) echo "the server sends more bytes than expected" ;;
    7) echo "$http_host:$http_port asked for no request before $(date -u -d "@$(($(clock) + http_wait))" +%Y-%m-%dT%H:%M:%SZ) (Retry-After; $http_wait s left)" ;;
    *) echo "the HTTPS client failed ($1)" ;;
    esac
}

# --- Retry-After (RFC 9110 section 10.2.3) ---------------------------------------------------
# A 429 or 503 answer with Retry-After stops every request to that endpoint until the time
# it names (STATE_DIR/fleet/not-before.HOST-PORT: seconds since 1970), at most
# MAX_RETRY_AFTER from when it was received; a value that is neither seconds nor an
# HTTP-date is ignored. Both are history entries (backoff).
backoff_file() { echo "$FLEET_DIR/not-before.$http_host-$http_port"; }

# backoff_left: the seconds before the next request to http_host:http_port may be made.
backoff_left() {
    _bl_until=$(cat "$(backoff_file)" 2> /dev/null)
    is_number "$_bl_until" || { echo 0; return; }
    _bl_now=$(clock)
    if [ "$_bl_until" -le "$_bl_now" ]; then
        echo 0
    elif [ $((_bl_until - _bl_now)) -gt "$MAX_RETRY_AFTER" ]; then
        # The clock went back since: the wait is still bounded.
        echo $((_bl_now + MAX_RETRY_AFTER)) | shared_write "$(backoff_file)"
        echo "$MAX_RETRY_AFTER"
    else
        echo $((_bl_until - _bl_now))
    fi
}

# backoff_from_answer: the Retry-After of a 429 or 503 answer ($WORK/http.retry), stored.
backoff_from_answer() {
    [ -s "$WORK/http.retry" ] || return 0
    _ba_raw=$(sed 's/^[ \t]*//; s/[ \t]*$//' "$WORK/http.retry")
    _ba_what="HTTP $http_status from $http_host:$http_port"
    if ! _ba_seconds=$(retry_after_seconds "$_ba_raw"); then
        record backoff "$_ba_what: Retry-After '$_ba_raw' is neither seconds nor an HTTP-date; ignored"
        return 0
    fi
    [ "$_ba_seconds" -gt 0 ] || return 0
    http_backoff=1 http_wait=$_ba_seconds
    mkdir -p "$FLEET_DIR" 2> /dev/null
    echo $(($(clock) + _ba_seconds)) | shared_write "$(backoff_file)"
    record backoff "$_ba_what: Retry-After '$_ba_raw': no request to it for $_ba_seconds s"
}

# retry_after_seconds VALUE: delay-seconds or an HTTP-date as seconds from now, from 0 to
# MAX_RETRY_AFTER (a date in the past is 0, anything longer is cut); status 1 otherwise.
retry_after_seconds() {
    case $1 in
    "" | *[!0-9]*)
        _rs_at=$(http_date_epoch "$1") || return 1
        _rs_left=$((_rs_at - $(clock)))
        [ "$_rs_left" -ge 0 ] || _rs_left=0 ;;
    *)
        _rs_left=$(decimal "$1")
        [ "${#_rs_left}" -le 9 ] || _rs_left=$MAX_RETRY_AFTER ;;
    esac
    [ "$_rs_left" -le "$MAX_RETRY_AFTER" ] || _rs_left=$MAX_RETRY_AFTER
    echo "$_rs_left"
}

# http_date_epoch TEXT: the seconds since 1970 of an HTTP-date (RFC 9110 section 5.6.7: the
# IMF-fixdate "Sun, 06 Nov 1994 08:49:37 GMT", and the obsolete RFC 850 and asctime forms,
# which a recipient must accept too); status 1 for anything else. Years 1970 to 9999.
http_date_epoch() {
    awk -v text="$1" -v now="$(clock)" '
    function number(s, digits) { return s ~ ("^" digits "$") }
    BEGIN {
        n = split(text, f, " ")
        wkday = "^(Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
        d2 = "[0-9][0-9]"
        if (n == 6 && f[1] ~ (wkday ",$") && f[6] == "GMT" && number(f[2], d2) && number(f[4], d2 d2)) {
            day = f[2]; month = f[3]; year = f[4]; hms = f[5]
        } else if (n == 4 && f[1] ~ (wkday "[a-z]*day,$") && f[4] == "GMT" && split(f[2], g, "-") == 3 \
                   && number(g[1], d2) && number(g[3], d2)) {
            day = g[1]; month = g[2]; hms = f[3]
            # two digits: the most recent such year not more than 50 years ahead
            year = 2000 + g[3]
            if (year > 1970 + int(now / 31556952) + 50) year -= 100
        } else if (n == 5 && f[1] ~ (wkday "$") && number(f[3], "[0-9][0-9]?") && number(f[5], d2 d2)) {
            month = f[2]; day = f[3]; hms = f[4]; year = f[5]
        } else exit 1
        m = index("JanFebMarAprMayJunJulAugSepOctNovDec", month)
        if (length(month) != 3 || m == 0 || (m - 1) % 3 != 0) exit 1
        m = (m + 2) / 3
        if (!number(hms, d2 ":" d2 ":" d2)) exit 1
        split(hms, t, ":")
        if (day < 1 || day > 31 || t[1] > 23 || t[2] > 59 || t[3] > 60 || year < 1970) exit 1
        # days from 1970-01-01 of a proleptic Gregorian date (year >= 1)
        y = year - (m <= 2)
        era = int(y / 400); yoe = y - era * 400
        doy = int((153 * ((m + 9) % 12) + 2) / 5) + day - 1
        days = era * 146097 + yoe * 365 + int(yoe / 4) - int(yoe / 100) + doy - 719468
        printf "%.0f\n", days * 86400 + t[1] * 3600 + t[2] * 60 + t[3]
    }'
}

# shared_write FILE < CONTENT: a whole new FILE, through a temporary name of this process
# only (atomic_write's FILE.new would be shared by two processes writing FILE at once).
shared_write() {
    _sw_tmp=$1.$$.$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
    cat > "$_sw_tmp" && mv -f "$_sw_tmp" "$1" || { rm -f "$_sw_tmp"; return 1; }
}

# fleet_wait TEXT: the server asked this device to wait (Retry-After): status and history
# say so, the pass ends with 5 (not now); nothing of the update state changes.
fleet_wait() {
    fleet_note waiting "$*"
    die 5 "waiting: $*"
}

# --- the signed index (docs/repository-format.md sections 2-5) -------------------------------
# index_verify FILE: the frame, the signatures with the index keys, the body's grammar, the
# repository name, the serial (rollback) and the expiry (freeze). Only then is the body kept
# ($FLEET_DIR/index.body) and the serial and issue time stored.
index_verify() {
    _iv_file=$1
    bundle_name="index from $fleet_host"
    _iv_size=$(size_of "$_iv_file")
    [ "$_iv_size" -ge 33 ] && take 33 < "$_iv_file" | grep -qx 'AVOINDEX 1 [0-9]\{10\} [0-9]\{10\}' \
        || fleet_refuse 3 "$bundle_name: not a signed index (AVOINDEX 1 header)"
    read -r _ _ _iv_body _iv_block < "$_iv_file"
    _iv_body=$(decimal "$_iv_body")
    _iv_block=$(decimal "$_iv_block")
    [ "$_iv_body" -ge 1 ] && [ "$_iv_body" -le "$MAX_INDEX_REGION" ] && [ "$_iv_block" -ge 1 ] \
        && [ "$_iv_block" -le "$MAX_INDEX_REGION" ] || fleet_refuse 3 "$bundle_name: region sizes out of bounds"
    [ "$_iv_size" -eq $((33 + _iv_body + _iv_block)) ] \
        || fleet_refuse 3 "$bundle_name: $_iv_size bytes, the header announces $((33 + _iv_body + _iv_block))"
    dd if="$_iv_file" bs=65536 skip=33 count="$_iv_body" iflag=skip_bytes,count_bytes 2> /dev/null > "$WORK/manifest"
    dd if="$_iv_file" bs=65536 skip=$((33 + _iv_body)) iflag=skip_bytes 2> /dev/null > "$WORK/signatures"
    [ "$(head -n 1 "$WORK/signatures")" = "avobuild-signatures 1" ] \
        || fleet_refuse 3 "$bundle_name: signature block: bad first line"
    _iv_keys=$KEYS_DIR _iv_threshold=$SIGNATURE_THRESHOLD
    KEYS_DIR=$INDEX_KEYS SIGNATURE_THRESHOLD=$INDEX_THRESHOLD FLEET_REFUSE=1
    verify_signatures
    KEYS_DIR=$_iv_keys SIGNATURE_THRESHOLD=$_iv_threshold FLEET_REFUSE=0
    index_body_check "$WORK/manifest"
    _iv_name=$(sed -n 2p "$WORK/manifest" | cut -d' ' -f2)
    _iv_serial=$(sed -n 3p "$WORK/manifest" | cut -d' ' -f2)
    _iv_issued=$(sed -n 4p "$WORK/manifest" | cut -d' ' -f2)
    _iv_expires=$(sed -n 5p "$WORK/manifest" | cut -d' ' -f2)
    [ "$_iv_expires" -gt "$_iv_issued" ] || fleet_refuse 3 "$bundle_name: expires is not after issued"
    [ "$_iv_name" = "$fleet_product" ] \
        || fleet_refuse 3 "$bundle_name: the index is for repository $_iv_name, this device's is $fleet_product"
    _iv_last=$(cat "$FLEET_DIR/index-serial" 2> /dev/null)
    is_number "$_iv_last" || _iv_last=0
    [ "$_iv_serial" -ge "$_iv_last" ] \
        || fleet_refuse 3 "$bundle_name: serial $_iv_serial is older than $_iv_last, the last one accepted (a replayed index)"
    # The newest issue time accepted is signed evidence of the time: a clock reset to the past
    # does not make an expired index look fresh.
    _iv_now=$(clock)
    _iv_floor=$(cat "$FLEET_DIR/index-issued" 2> /dev/null)
    is_number "$_iv_floor" || _iv_floor=0
    [ "$_iv_now" -ge "$_iv_floor" ] || _iv_now=$_iv_floor
    [ "$_iv_now" -lt "$_iv_expires" ] \
        || fleet_refuse 3 "$bundle_name: expired at $_iv_expires, the time is at least $_iv_now (a frozen or stale index, or a clock far ahead)"
    mkdir -p "$FLEET_DIR" || fleet_refuse 1 "$FLEET_DIR: cannot be created"
    atomic_write "$FLEET_DIR/index.body" < "$WORK/manifest" || fleet_refuse 1 "$FLEET_DIR: cannot store the index (data partition full?)"
    echo "$_iv_serial" | atomic_write "$FLEET_DIR/index-serial" || fleet_refuse 1 "$FLEET_DIR: cannot store the index serial"
    [ "$_iv_issued" -le "$_iv_floor" ] || echo "$_iv_issued" | atomic_write "$FLEET_DIR/index-issued"
    index_serial=$_iv_serial
}

# index_body_check BODY: every rule of section 3 (grammar, order, uniqueness, bounds).
index_body_check() {
    [ "$(LC_ALL=C tr -d '\n -~' < "$1" | wc -c)" -eq 0 ] && [ "$(tail -c 1 "$1" | od -An -tx1 | tr -d ' ')" = 0a ] \
        || fleet_refuse 3 "$bundle_name: body: a byte outside printable ASCII, or no final newline"
    _ib_n='\(0\|[1-9][0-9]\{0,17\}\)'
    _ib_id='[A-Za-z0-9][A-Za-z0-9._+~:@-]\{0,127\}'
    _ib_pat='[A-Za-z0-9*?][A-Za-z0-9._+~:@*?-]\{0,127\}'
    _ib_line=0
    for _ib_pattern in 'avobuild-index 1' "repository $_ib_id" "serial [1-9][0-9]\{0,17\}" \
        "issued $_ib_n" "expires $_ib_n"; do
        _ib_line=$((_ib_line + 1))
        sed -n "${_ib_line}p" "$1" | grep -qx "$_ib_pattern" || fleet_refuse 3 "$bundle_name: body line $_ib_line"
    done
    if tail -n +6 "$1" | grep -vqx -e "release $_ib_pat $_ib_id $_ib_n $_ib_n [0-9a-f]\{64\}" \
        -e "delta $_ib_pat $_ib_id $_ib_id $_ib_n [0-9a-f]\{64\}" \
        -e "rollout [a-z0-9][a-z0-9_-]\{0,31\} $_ib_id \(0\|[1-9][0-9]\{0,3\}\|10000\)"; then
        fleet_refuse 3 "$bundle_name: body: a line that is not a release, delta or rollout line"
    fi
    tail -n +6 "$1" | LC_ALL=C awk '
    function refuse(why) { print "body line " NR + 5 ": " why; exit 1 }
    { rank = $1 == "release" ? 1 : $1 == "delta" ? 2 : 3
      if (rank < last) refuse("release, delta and rollout lines come in that order")
      last = rank }
    $1 == "release" {
      if (++releases > 1000) refuse("more than 1000 releases")
      key = $2 " " $3
      if (releases > 1 && key <= release_key) refuse("releases not sorted, or repeated")
      release_key = key; target[key] = 1; version[$3 ""] = 1
      if ($6 in file) refuse("a bundle listed twice"); file[$6] = 1 }
    $1 == "delta" {
      if (++deltas > 4000) refuse("more than 4000 deltas")
      if (($3 "") == ($4 "")) refuse("a delta to its own version")
      key = $2 " " $3 " " $4
      if (deltas > 1 && key <= delta_key) refuse("deltas not sorted, or repeated")
      delta_key = key
      if (!(($2 " " $4) in target)) refuse("a delta to a release the index does not list")
      if ($6 in file) refuse("a bundle listed twice"); file[$6] = 1 }
    $1 == "rollout" {
      if (++rollouts > 1000) refuse("more than 1000 rollouts")
      if (!(($3 "") in version)) refuse("a rollout of a version no release line has")
      if (($2 "") != channel) {
        if (rollouts > 1 && ($2 "") <= channel) refuse("rollouts not grouped by sorted channel")
        if (++channels > 64) refuse("more than 64 channels")
        channel = $2 "" }
      if (($2 " " $3) in offered) refuse("a version twice in one channel")
      offered[$2 " " $3] = 1 }' > "$WORK/index.check" \
        || fleet_refuse 3 "$bundle_name: $(cat "$WORK/index.check")"
}

# index_release VERSION: "SIZE SHA256" of the first release line of VERSION this device may
# install (its compatible pattern matches), from the verified body; status 1 if none.
index_release() {
    awk -v v="$1" '$1 == "release" && ($3 "") == v { print $2, $5, $6 }' "$FLEET_DIR/index.body" \
        > "$WORK/index.found"
    while read -r _ir_pattern _ir_size _ir_sha; do
        # shellcheck disable=SC2254  # the index's compatible pattern
        case $avo_compatible in $_ir_pattern) echo "$_ir_size $_ir_sha"; return 0 ;; esac
    done < "$WORK/index.found"
    return 1
}

# index_delta FROM TO: "SIZE SHA256" of a delta from FROM to TO for this device, if any.
index_delta() {
    awk -v f="$1" -v t="$2" '$1 == "delta" && ($3 "") == f && ($4 "") == t { print $2, $5, $6 }' \
        "$FLEET_DIR/index.body" > "$WORK/index.found"
    while read -r _id_pattern _id_size _id_sha; do
        # shellcheck disable=SC2254
        case $avo_compatible in $_id_pattern) echo "$_id_size $_id_sha"; return 0 ;; esac
    done < "$WORK/index.found"
    return 1
}

# static_offer: section 6 of repository-format.md, computed on the device (Mode = static):
# prints "update VERSION" or "none REASON".
static_offer() {
    awk -v c="$fleet_cohort" '$1 == "rollout" && ($2 "") == c { print $3, $4 }' "$FLEET_DIR/index.body" \
        > "$WORK/channel"
    _so_position=0 _so_installed=0 _so_chosen=0 _so_pending=0 _so_offer=
    while read -r _so_version _so_points; do
        _so_position=$((_so_position + 1))
        index_release "$_so_version" > /dev/null || continue
        [ "$_so_version" != "$running_version" ] || [ "$_so_installed" -ne 0 ] || _so_installed=$_so_position
        [ "$_so_chosen" -eq 0 ] || continue
        _so_bucket=$(printf 'avobuild-rollout 1 %s %s' "$_so_version" "$device_id" | sha256sum | cut -c1-8)
        if [ $((0x$_so_bucket % 10000)) -lt "$_so_points" ]; then
            _so_chosen=$_so_position _so_offer=$_so_version
        elif [ "$_so_pending" -eq 0 ]; then
            _so_pending=$_so_position
        fi
    done < "$WORK/channel"
    if [ "$_so_chosen" -gt 0 ] && { [ "$_so_installed" -eq 0 ] || [ "$_so_installed" -gt "$_so_chosen" ]; }; then
        echo "update $_so_offer"
    elif [ "$_so_pending" -gt 0 ] && { [ "$_so_installed" -eq 0 ] || [ "$_so_pending" -lt "$_so_installed" ]; }; then
        echo "none rollout"
    elif [ "$_so_chosen" -gt 0 ] || [ "$_so_installed" -gt 0 ]; then
        echo "none current"
    else
        echo "none no-release"
    fi
}

# server_offer: the server's answer (docs/fleet.md, "The text form"), believed only where the
# signed index agrees: prints "update VERSION" or "none REASON [SECONDS]".
server_offer() {
    http_request GET "$fleet_prefix/updates/check/$device_id?version=$running_version&compatible=$avo_compatible&channel=$fleet_cohort" \
        "$WORK/check.txt" 4096
    _sv_code=$?
    [ "$http_backoff" = 0 ] || fleet_wait "check at $fleet_host: $(http_why "$_sv_code")"
    [ "$_sv_code" = 0 ] || fleet_refuse 1 "check at $fleet_host: $(http_why "$_sv_code")"
    [ "$(head -n 1 "$WORK/check.txt")" = "avobuild-check 1" ] && [ "$(wc -l < "$WORK/check.txt")" -le 5 ] \
        && [ "$(LC_ALL=C tr -d '\n -~' < "$WORK/check.txt" | wc -c)" -eq 0 ] \
        || fleet_refuse 3 "check at $fleet_host: not an avobuild-check 1 answer"
    _sv_line=$(sed -n 4p "$WORK/check.txt")
    set -f
    # shellcheck disable=SC2086  # the fields of one checked line
    set -- $_sv_line
    set +f
    case $1 in
    update)
        [ $# -eq 5 ] && is_name identifier "$2" && is_number "$3" && is_sha256 "$4" \
            || fleet_refuse 3 "check at $fleet_host: malformed update line"
        _sv_release=$(index_release "$2") \
            || fleet_refuse 3 "the server offers $2, which the signed index has no release of for $avo_compatible"
        [ "$_sv_release" = "$3 $4" ] \
            || fleet_refuse 3 "the server offers $2 as $3 bytes with sha256 $4; the signed index says $_sv_release"
        echo "update $2" ;;
    none)
        [ $# -ge 2 ] && [ $# -le 3 ] && is_name identifier "$2" || fleet_refuse 3 "check at $fleet_host: malformed none line"
        echo "none $2 ${3:-}" ;;
    *) fleet_refuse 3 "check at $fleet_host: neither update nor none" ;;
    esac
}

# fleet_check: fetch and verify the index, then the offer; sets offer_version (empty: none)
# and offer_reason, and writes $FLEET_DIR/offer.
fleet_check() {
    benv_load
    booted=$(booted_slot)
    running_version=$(slot_var "$booted" version)
    mkdir -p "$FLEET_DIR" || die 1 "$FLEET_DIR: cannot be created"
    http_request GET "$fleet_prefix/index.signed" "$WORK/index.signed" $((33 + 2 * MAX_INDEX_REGION))
    _fc_code=$?
    [ "$http_backoff" = 0 ] || fleet_wait "index from $fleet_host: $(http_why "$_fc_code")"
    [ "$_fc_code" = 0 ] || fleet_refuse 1 "index from $fleet_host: $(http_why "$_fc_code")"
    index_verify "$WORK/index.signed"
    if [ "$fleet_mode" = static ]; then _fc_answer=$(static_offer); else _fc_answer=$(server_offer) || exit $?; fi
    set -f
    # shellcheck disable=SC2086  # the words of the offer
    set -- $_fc_answer
    set +f
    offer_version='' offer_reason=${2:-} offer_wait=${3:-}
    [ "$1" != update ] || offer_version=$2 offer_reason=
    printf 'serial=%s\nversion=%s\nreason=%s\n' "$index_serial" "$offer_version" "$offer_reason" \
        | atomic_write "$FLEET_DIR/offer"
    # The server's update window opens in offer_wait seconds: the agent checks again then.
    rm -f "$FLEET_DIR/retry-after"
    if [ "$offer_reason" = window ] && is_number "$offer_wait" 604800; then
        echo "$offer_wait" > "$FLEET_DIR/retry-after"
    fi
    if [ -n "$offer_version" ]; then
        fleet_note check "index $index_serial: $offer_version offered (running $running_version)"
    else
        fleet_note check "index $index_serial: nothing offered ($offer_reason${offer_wait:+, retry after $offer_wait s})"
    fi
}

cmd_check() {
    parse_common "$@"
    agent_conf_load
    telemetry_load
    telemetry_usable
    fleet_check
    telemetry_send_if_due
    if [ -n "$offer_version" ]; then
        echo "update available: $offer_version (running $running_version, index serial $index_serial)"
    else
        echo "no update: $offer_reason${offer_wait:+ (retry after $offer_wait s)} (running $running_version, index serial $index_serial)"
    fi
}

# --- downloads through the index --------------------------------------------------------------
# fleet_download VERSION: the delta from the running version when the index has a smaller
# one, else the full bundle; resumed from a partial file; size and sha256 as the index says.
# Sets downloaded (the file).
fleet_download() {
    _fd_version=$1
    is_name identifier "$_fd_version" || die 2 "--version: '$_fd_version' is not a version"
    [ -f "$FLEET_DIR/index.body" ] || die 5 "no verified index yet: run 'avocado-update check' first"
    _fd_full=$(index_release "$_fd_version") \
        || fleet_refuse 3 "the signed index has no release $_fd_version for $avo_compatible"
    _fd_delta=$(index_delta "$running_version" "$_fd_version") || _fd_delta=
    set -f
    # shellcheck disable=SC2086  # "SIZE SHA256"
    set -- $_fd_full
    _fd_size=$1 _fd_sha=$2 _fd_kind=false
    if [ -n "$_fd_delta" ]; then
        # shellcheck disable=SC2086  # "SIZE SHA256"
        set -- $_fd_delta
        [ "$1" -ge "$_fd_size" ] || _fd_size=$1 _fd_sha=$2 _fd_kind=true
    fi
    set +f
    _fd_dir=$STATE_DIR/downloads
    downloaded=$_fd_dir/$_fd_sha.avb
    mkdir -p "$_fd_dir" || fleet_refuse 1 "$_fd_dir: cannot be created"
    if [ -f "$downloaded" ] && [ "$(size_of "$downloaded")" = "$_fd_size" ] && [ "$(sha_of "$downloaded")" = "$_fd_sha" ]; then
        return 0
    fi
    _fd_part=$_fd_dir/$_fd_sha.part
    _fd_have=0
    [ ! -f "$_fd_part" ] || _fd_have=$(size_of "$_fd_part")
    [ "$_fd_have" -lt "$_fd_size" ] || { rm -f "$_fd_part"; _fd_have=0; }
    # Room for what is left, plus the applier's own margin, before a byte is fetched.
    _fd_free=$(df -k -P "$_fd_dir" 2> /dev/null | awk 'NR == 2 { print $4 }')
    is_number "$_fd_free" || _fd_free=0
    _fd_need=$(((_fd_size - _fd_have) / 1024 + 1))
    [ "$_fd_free" -ge "$_fd_need" ] \
        || fleet_refuse 1 "data partition full: $_fd_free KiB free in $_fd_dir, $_fd_need KiB needed for $_fd_version"
    _fd_started=$(clock)
    http_request GET "$fleet_prefix/bundles/$_fd_sha.avb" "$_fd_part" $((_fd_size - _fd_have)) \
        "$_fd_have" "$_fd_sha"
    _fd_code=$?
    _fd_what="download of $_fd_version ($([ "$_fd_kind" = true ] && echo "delta from $running_version" || echo "full bundle"))"
    # The server asked for a pause: the partial file stays for the next pass; not a failure.
    [ "$http_backoff" = 0 ] || fleet_wait "$_fd_what: $(http_why "$_fd_code")"
    _fd_event="\"duration\":$(($(clock) - _fd_started)),\"bytes\":$http_got,\"delta\":$_fd_kind"
    [ "$_fd_kind" = false ] || _fd_event="$_fd_event,\"from\":\"$running_version\""
    if [ "$_fd_code" != 0 ]; then
        telemetry_event download "$_fd_version" failed "$_fd_event"
        if [ "$_fd_code" = 6 ]; then
            rm -f "$_fd_part"
            fleet_refuse 3 "$_fd_what: $(http_why "$_fd_code") (the index says $_fd_size bytes); nothing kept"
        fi
        fleet_refuse 1 "$_fd_what: $(http_why "$_fd_code") (run again to resume)"
    fi
    _fd_got_sha=$(sha_of "$_fd_part")
    if [ "$(size_of "$_fd_part")" != "$_fd_size" ] || [ "$_fd_got_sha" != "$_fd_sha" ]; then
        rm -f "$_fd_part"
        telemetry_event download "$_fd_version" failed "$_fd_event"
        fleet_refuse 3 "$_fd_what: the file has sha256 $_fd_got_sha, the signed index says $_fd_sha (removed)"
    fi
    mv -f "$_fd_part" "$downloaded" && sync
    telemetry_event download "$_fd_version" ok "$_fd_event"
    record download "$_fd_version" "$downloaded" "delta=$_fd_kind" "bytes=$http_got"
}

# download --version V through the agent configuration, when there is one.
cmd_download_version() {
    agent_conf_load
    telemetry_load
    telemetry_usable
    benv_load
    booted=$(booted_slot)
    running_version=$(slot_var "$booted" version)
    reset_if_stale
    fleet_download "$version_arg"
    set_state Idle "bundle=$downloaded"
    echo "$downloaded"
}

# --- the agent ----------------------------------------------------------------------------------
# window_minutes HH:MM-HH:MM: "START END" in minutes of the day.
window_minutes() {
    case $1 in [0-2][0-9]:[0-5][0-9]-[0-2][0-9]:[0-5][0-9]) ;; *) return 1 ;; esac
    _wm_start=$(($(decimal "$(echo "$1" | cut -c1-2)") * 60 + $(decimal "$(echo "$1" | cut -c4-5)")))
    _wm_end=$(($(decimal "$(echo "$1" | cut -c7-8)") * 60 + $(decimal "$(echo "$1" | cut -c10-11)")))
    [ "$_wm_start" -lt 1440 ] && [ "$_wm_end" -lt 1440 ] && [ "$_wm_start" -ne "$_wm_end" ] || return 1
    echo "$_wm_start $_wm_end"
}

# in_window: the device's local time of day lies in UpdateWindow (which may cross midnight).
in_window() {
    [ -n "$update_window" ] || return 0
    _iw_span=$(window_minutes "$update_window")
    set -f
    # shellcheck disable=SC2086  # "START END"
    set -- $_iw_span
    set +f
    _iw_hm=$(date -d "@$(clock)" +%H:%M)
    _iw_now=$(($(decimal "${_iw_hm%:*}") * 60 + $(decimal "${_iw_hm#*:}")))
    if [ "$1" -lt "$2" ]; then
        [ "$_iw_now" -ge "$1" ] && [ "$_iw_now" -lt "$2" ]
    else
        [ "$_iw_now" -ge "$1" ] || [ "$_iw_now" -lt "$2" ]
    fi
}

random_below() {  # N: a random number from 0 to N-1 (0 when N is 0)
    [ "$1" -gt 0 ] || { echo 0; return; }
    echo $(( $(od -An -N4 -tu4 /dev/urandom | tr -d ' ') % $1 ))
}

# agent_pass: one check; download and apply as agent.conf allows; send telemetry.
agent_pass() {
    telemetry_send_if_due
    case $(state_get state) in
    Testing | RollingBack | Applying)
        fleet_note waiting "an update is in progress (state $(state_get state)); checking later"
        return 0 ;;
    esac
    fleet_check
    [ -n "$offer_version" ] || { telemetry_send_if_due; return 0; }
    if grep -qx "$offer_version" "$FLEET_DIR/rolled-back" 2> /dev/null; then
        fleet_note waiting "$offer_version was rolled back on this device; not installed again"
        echo "update $offer_version skipped: it was rolled back on this device"
        telemetry_send_if_due
        return 0
    fi
    if ! in_window; then
        fleet_note waiting "$offer_version waits for the update window $update_window"
        echo "update $offer_version waits for the update window $update_window"
        return 0
    fi
    [ "$auto_download" = true ] || { echo "update available: $offer_version (AutoDownload = false)"; return 0; }
    reset_if_stale
    set_state Downloading "bundle=" "version=$offer_version"
    fleet_download "$offer_version"
    set_state Idle "bundle=$downloaded"
    echo "downloaded $offer_version: $downloaded"
    if [ "$auto_apply" != true ]; then
        telemetry_send_if_due
        return 0
    fi
    bundle=$downloaded
    _ap_started=$(clock)
    ( cmd_apply --bundle "$downloaded" ) || {
        _ap_code=$?
        telemetry_event apply "$offer_version" failed "\"duration\":$(($(clock) - _ap_started)),\"from\":\"$running_version\""
        fleet_refuse "$_ap_code" "apply of $offer_version failed (see the history)"
    }
    telemetry_event apply "$offer_version" ok "\"duration\":$(($(clock) - _ap_started)),\"from\":\"$running_version\""
    ( cmd_commit ) || fleet_refuse 1 "commit of $offer_version failed"
    telemetry_send
    reboot_now
}

cmd_agent() {
    once=0
    for _ca_arg in "$@"; do
        case $_ca_arg in
        --once) once=1 ;;
        -h | --help) verb_help agent; exit 0 ;;
        *) usage "agent [--once]" ;;
        esac
    done
    parse_common
    agent_conf_load
    telemetry_load
    telemetry_usable
    if [ "$once" = 1 ]; then
        agent_pass
        return
    fi
    # A fleet that boots at once (a power cut, a broadcast reboot) does not call in at once.
    sleep "$(random_below $((random_delay + 1)))"
    while :; do
        ( agent_pass ) || log "agent pass ended with status $?; next check in about $check_interval s"
        _ca_wait=$check_interval
        _ca_hint=$(cat "$FLEET_DIR/retry-after" 2> /dev/null)
        ! is_number "$_ca_hint" || [ "$_ca_hint" -ge "$_ca_wait" ] || _ca_wait=$((_ca_hint + 1))
        # Never before the server's Retry-After (the pass would only wait again).
        _ca_left=$(backoff_left)
        [ "$_ca_left" -lt "$_ca_wait" ] || _ca_wait=$((_ca_left + 1))
        sleep $((_ca_wait + $(random_below $((random_delay + 1)))))
    done
}

# rolled_back VERSION: the agent does not install VERSION again by itself (a release that
# failed here; an operator can still install it by hand, or delete the file).
rolled_back() {
    is_name identifier "$1" || return 0
    mkdir -p "$FLEET_DIR" 2> /dev/null || return 0
    { grep -vx "$1" "$FLEET_DIR/rolled-back" 2> /dev/null | tail -n 63; echo "$1"; } > "$WORK/rolled-back"
    atomic_write "$FLEET_DIR/rolled-back" < "$WORK/rolled-back" 2> /dev/null || :
}

# --- telemetry (update-telemetry.yaml; the events of avobuild/fleet/telemetry.py) -----------
# The queue is a directory, STATE_DIR/telemetry/spool, of one file per event, named
# SEQUENCE-RANDOM (its id after the device's prefix). The agent, the boot hook and the health
# check are separate processes that may queue and send at the same moment, and any of them
# may be killed at any point: no file is ever rewritten, so nothing needs a lock (busybox has
# no flock). An event is written under a temporary name of its process and renamed into
# place, so it is there whole or not at all; sending removes exactly the files the server
# answered for; the random part keeps two events apart when two processes take the same
# sequence number; and the server keeps one copy per id, so an event sent again after a kill
# is never stored twice.
TELEMETRY_SPOOL=$TELEMETRY_DIR/spool
TELEMETRY_NAME='[0-9][0-9]*-[0-9a-f][0-9a-f]*'  # BRE and ERE alike

# telemetry_event TYPE VERSION RESULT [JSON-FIELDS]: one event, queued on the data partition
# with an id this device never reuses (a random prefix made once, a counter and 32 random
# bits). Past max_queue bytes the oldest events go. A full data partition loses the new
# event, never one already queued.
telemetry_event() {
    [ "${telemetry_on:-}" ] || { [ -f "$AGENT_CONF" ] && telemetry_load; } || return 0
    [ "$telemetry_on" = 1 ] || return 0
    case $1 in
    download) _te_item=download_time ;;
    apply) _te_item=apply_time ;;
    boot) _te_item=boot_time ;;
    validation | confirm) _te_item=validation_results ;;
    rollback) _te_item=rollback_events ;;
    *) _te_item=error_logs ;;
    esac
    case $telemetry_collect in *" $_te_item "*) ;; *) return 0 ;; esac
    is_name identifier "$2" || set -- "$1" unknown "$3" "${4:-}"
    mkdir -p "$TELEMETRY_SPOOL" 2> /dev/null || return 0
    _te_prefix=$(cat "$TELEMETRY_DIR/prefix" 2> /dev/null)
    case $_te_prefix in ????????????????) ;; *)
        _te_prefix=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
        echo "$_te_prefix" | shared_write "$TELEMETRY_DIR/prefix" 2> /dev/null || return 0 ;;
    esac
    _te_seq=$(cat "$TELEMETRY_DIR/sequence" 2> /dev/null)
    is_number "$_te_seq" || _te_seq=0
    _te_seq=$((_te_seq + 1))
    echo "$_te_seq" | shared_write "$TELEMETRY_DIR/sequence" 2> /dev/null
    _te_name=$_te_seq-$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
    _te_line="{\"id\":\"$_te_prefix-$_te_name\",\"type\":\"$1\",\"time\":$(clock),\"version\":\"$2\",\"result\":\"$3\"${4:+,$4}}"
    [ "$1" != rollback ] || _te_line=$(printf '%s' "$_te_line" | sed 's/,"result":"failed"//')
    telemetry_trim $((${#_te_line} + 1))
    _te_new=$TELEMETRY_SPOOL/.new-$$-$_te_name
    if printf '%s\n' "$_te_line" > "$_te_new" && mv -f "$_te_new" "$TELEMETRY_SPOOL/$_te_name"; then
        sync
    else
        rm -f "$_te_new"
        return 0
    fi
    [ "$3" != failed ] && [ "$1" != rollback ] || : > "$TELEMETRY_DIR/urgent"
}

# telemetry_queued: the names of the queued events, oldest first (names this script made:
# anything else in the directory is left alone).
telemetry_queued() {
    # shellcheck disable=SC2010  # one name per line, of TELEMETRY_NAME's characters only
    ls "$TELEMETRY_SPOOL" 2> /dev/null | grep -x "$TELEMETRY_NAME" | sort -t- -k1,1n -k2,2
}

# telemetry_trim BYTES: the oldest events removed until BYTES more fit under max_queue.
telemetry_trim() {
    # shellcheck disable=SC2012  # the size and the name of each file, names as above
    ls -ln "$TELEMETRY_SPOOL" 2> /dev/null | awk -v name="^$TELEMETRY_NAME\$" '$NF ~ name { print $NF, $5 }' \
        | sort -t- -k1,1n -k2,2 | awk -v max="$telemetry_max" -v need="$1" '
        { name[NR] = $1; size[NR] = $2; total += $2 }
        END { for (i = 1; i <= NR && total + need > max; i++) { print name[i]; total -= size[i] } }' \
        > "$WORK/telemetry.trim"
    while read -r _tt_name; do rm -f "$TELEMETRY_SPOOL/$_tt_name"; done < "$WORK/telemetry.trim"
}

# telemetry_sweep: the temporary files of processes killed while queueing (none of their
# events was queued: the rename did not happen), and the single queue file of appliers before
# the spool, moved into it (ids unchanged: a copy sent twice is stored once).
telemetry_sweep() {
    for _tw_file in "$TELEMETRY_SPOOL"/.new-*; do
        [ -f "$_tw_file" ] || continue
        _tw_pid=${_tw_file##*/.new-}
        _tw_pid=${_tw_pid%%-*}
        is_number "$_tw_pid" && kill -0 "$_tw_pid" 2> /dev/null || rm -f "$_tw_file"
    done
    [ -f "$TELEMETRY_DIR/queue" ] || return 0
    _tw_count=0
    while IFS= read -r _tw_line; do
        _tw_count=$((_tw_count + 1))
        printf '%s\n' "$_tw_line" > "$TELEMETRY_SPOOL/.new-$$-0-$_tw_count" \
            && mv -f "$TELEMETRY_SPOOL/.new-$$-0-$_tw_count" "$TELEMETRY_SPOOL/0-$_tw_count" || return 0
    done < "$TELEMETRY_DIR/queue"
    sync
    rm -f "$TELEMETRY_DIR/queue"
}

# telemetry_send: the queued events, TELEMETRY_BATCH at a time, to the telemetry endpoint;
# each batch's files removed once the server answered it (stored or duplicate), all kept
# when it cannot be reached.
telemetry_send() {
    [ "${telemetry_on:-0}" = 1 ] && [ -n "${fleet_host:-}" ] || return 0
    [ -z "${telemetry_bad:-}" ] || { log "telemetry kept for later: $telemetry_bad"; return 1; }
    mkdir -p "$TELEMETRY_SPOOL" 2> /dev/null || return 1
    telemetry_sweep
    http_to telemetry
    telemetry_send_batches
    _ts_status=$?
    http_to fleet
    return "$_ts_status"
}

telemetry_send_batches() {
    # An event that turns urgent while this runs leaves the mark for the next pass.
    _tb_urgent=0
    [ ! -f "$TELEMETRY_DIR/urgent" ] || { _tb_urgent=1; rm -f "$TELEMETRY_DIR/urgent"; }
    while telemetry_queued | head -n "$TELEMETRY_BATCH" > "$WORK/batch.names" && [ -s "$WORK/batch.names" ]; do
        : > "$WORK/batch"
        while read -r _tb_name; do
            cat "$TELEMETRY_SPOOL/$_tb_name" >> "$WORK/batch" 2> /dev/null || :  # gone: sent by another
        done < "$WORK/batch.names"
        if [ -s "$WORK/batch" ]; then
            _tb_count=$(wc -l < "$WORK/batch" | tr -d ' ')
            { printf '{"events":['; sed '$!s/$/,/' "$WORK/batch" | tr -d '\n'; printf ']}'; } > "$WORK/batch.json"
            http_request POST "$http_prefix/telemetry" "$WORK/telemetry.answer" 4096 0 "" "$WORK/batch.json"
            _tb_code=$?
            if [ "$_tb_code" = 2 ] && [ "$http_status" = 400 ]; then
                record telemetry "$http_host refused $_tb_count events, dropped: $(clean "$(cat "$WORK/http.error")" 200)"
            elif [ "$_tb_code" != 0 ]; then
                log "telemetry kept for later: $(http_why "$_tb_code")"
                [ "$_tb_urgent" = 0 ] || : > "$TELEMETRY_DIR/urgent"
                return 1
            fi
        fi
        while read -r _tb_name; do rm -f "$TELEMETRY_SPOOL/$_tb_name"; done < "$WORK/batch.names"
        sync
        [ ! -e "$TELEMETRY_SPOOL/$(head -n 1 "$WORK/batch.names")" ] || return 1
    done
    clock | shared_write "$TELEMETRY_DIR/sent"
}

telemetry_send_if_urgent() {
    [ "${telemetry_on:-0}" = 1 ] && [ -f "$TELEMETRY_DIR/urgent" ] && [ "$telemetry_on_failure" = immediate ] || return 0
    telemetry_send || :
}

telemetry_send_if_due() {
    [ "${telemetry_on:-0}" = 1 ] || return 0
    _td_sent=$(cat "$TELEMETRY_DIR/sent" 2> /dev/null)
    is_number "$_td_sent" || _td_sent=0
    if [ -f "$TELEMETRY_DIR/urgent" ] || [ $(($(clock) - _td_sent)) -ge "$telemetry_interval" ]; then
        telemetry_send || :
    fi
}
