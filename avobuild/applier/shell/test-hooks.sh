# --- test hooks (avobuild/applier/shell/test-hooks.sh): only in test builds ------------------
# render_applier(..., test_hooks=True) links this file into the script instead of hooks.sh;
# a production applier never holds it. AVO_TEST_KILL_AFTER=N makes the script die like a power cut after its N-th
# write step: SIGKILL to the applier's whole process group (the delta applier runs in a
# background subshell). AVO_TEST_COUNTER names the file that counts the steps.
# AVO_TEST_WRITTEN names a file that adds up the bytes of slot chunk writes (checkpoint BYTES).
checkpoint() {
    if [ -n "${AVO_TEST_WRITTEN:-}" ] && [ -n "${1:-}" ]; then
        _cp_bytes=$(cat "$AVO_TEST_WRITTEN" 2> /dev/null)
        is_number "$_cp_bytes" || _cp_bytes=0
        echo $((_cp_bytes + $1)) > "$AVO_TEST_WRITTEN"
    fi
    [ -n "${AVO_TEST_KILL_AFTER:-}" ] || return 0
    _cp_counter=${AVO_TEST_COUNTER:-$STATE_DIR/.kill-counter}
    _cp_steps=$(cat "$_cp_counter" 2> /dev/null)
    is_number "$_cp_steps" || _cp_steps=0
    _cp_steps=$((_cp_steps + 1))
    echo "$_cp_steps" > "$_cp_counter"
    [ "$_cp_steps" -lt "$AVO_TEST_KILL_AFTER" ] || kill -9 0
}
# clock: the time, shifted by AVO_TEST_CLOCK_SHIFT seconds (a device whose clock is wrong).
clock() { echo $(($(date +%s) + ${AVO_TEST_CLOCK_SHIFT:-0})); }
