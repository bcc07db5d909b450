"""Boot selection state shared by the installer, the bootloader scripts and the applier."""
