"""Operating an installation: backup and restore (``animus backup``, ``animus restore``)."""
