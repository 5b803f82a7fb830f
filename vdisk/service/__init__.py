"""Process plumbing and the composition root: the daemon, its config, logs, mounts."""
