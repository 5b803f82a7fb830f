"""The FUSE export: one raw file per drive, served by pyfuse3."""
