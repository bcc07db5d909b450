"""The model: recipes, layouts and the applier's configuration, parsed once, frozen.

`tomlcheck` reads TOML strictly (every error names the file, the table and the key),
`layout` the disk layouts, `recipe` the product recipes (with their layout), `applier` the
`[applier]` and `[rollback]` tables, `guids` the partition type names, `serialize` the JSON
round trip of all of it. Nothing here runs a tool or touches a disk.
"""
