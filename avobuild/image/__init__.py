"""Images built from a recipe: slot filesystems and the factory disk image with its `.bmap`."""
