"""scripts/torture: a soak and crash loop for `vdisk serve` (see scripts/torture.py)."""
