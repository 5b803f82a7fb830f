"""The format engine: raw and qcow2 images and backing chains.

Synchronous and single-threaded per image; it knows nothing of trio, FUSE or QMP.
"""
