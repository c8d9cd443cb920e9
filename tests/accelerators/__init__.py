"""Checks of the accelerator paths: cross-lowering for TPU and GPU on CPU stand-in meshes, and GPU-only tests."""
