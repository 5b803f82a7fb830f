"""vdisk: serve qcow2/raw backing chains as raw files over FUSE, with copy-on-read and streaming."""

__version__ = "0.1.0"
