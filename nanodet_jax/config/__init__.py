"""Configs: ours (``configs/*.py``, ml_collections) and NanoDet's ``.yml``, with overrides."""
