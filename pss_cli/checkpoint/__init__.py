"""Checkpoint I/O: discover layouts, read headers, stream tensors lazily. No numerics here."""
