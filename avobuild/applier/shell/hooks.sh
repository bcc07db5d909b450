# --- avocado-update: hooks (avobuild/applier/shell/hooks.sh) ---------------------------------
# checkpoint: called after every write step a power cut may interrupt (slot chunks, delta
# operations, the boot state, state files). Nothing happens here; a test build links
# test-hooks.sh instead, which can stop the applier at any of these points.
checkpoint() { :; }
# clock: the time in seconds since 1970 (the agent's windows, expiry and telemetry).
clock() { date +%s; }
