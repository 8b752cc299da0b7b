"""The package's scripts (``cmp-hf train``, ``cmp-hf push``); ``recipes/`` holds thin launchers of the same code."""
