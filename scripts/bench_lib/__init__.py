"""scripts/bench: vdisk against qemu-storage-daemon, on the same backing chain."""
