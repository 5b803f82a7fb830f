"""The async block layer: one device per drive over its chain, range locks, jobs."""
