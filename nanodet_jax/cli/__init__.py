"""Command-line entry points (the ``nanodet-*`` console scripts)."""
