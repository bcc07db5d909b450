"""Disk images: partition tables (GPT, MBR) and the partition type identifiers they use."""
