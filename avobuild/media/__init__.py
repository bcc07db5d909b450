"""Recovery systems and the media that carry them.

`recovery` assembles the recovery system (kernel + initramfs) and its partition image, `usb`
the hybrid ISO for USB sticks and `pxe` the TFTP tree for network recovery.
"""
