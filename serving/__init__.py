"""Deployment: ONNX export (needs torch) and the torch-free ONNX Runtime detector.

Importing this package imports nothing heavy; import ``serving.export`` to export and
``serving.runtime`` to score without torch.
"""
