"""The control plane: QMP protocol (sans-IO), the trio server, commands, jobs and events."""
