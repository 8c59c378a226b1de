"""Deployment: ONNX export with NanoDet's contract (``onnx_export.py``)."""
