"""Binary deltas between slot images (docs/delta-format.md).

`plan.py` finds what the target shares with the source block by block, `encode.py` turns the
plan into a delta stream, `apply.py` replays a stream against a source image, `stream.py`
holds the stream's line grammar and `bundles.py` builds and measures delta bundles.
"""
