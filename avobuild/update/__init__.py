"""Updates applied on the host: full and delta bundles installed into a disk image.

`install` is the reference applier (the on-target shell applier follows the same rules),
`delta` replays a delta into the inactive slot, `target` resolves which partition an update
writes, `policy` checks the signed installation policy against the device's boot state.
"""
