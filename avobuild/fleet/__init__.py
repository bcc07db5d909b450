"""The update repository and its server (docs/fleet.md, docs/repository-format.md)."""
