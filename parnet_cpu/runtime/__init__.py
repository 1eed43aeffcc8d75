"""Torch-free inference side: OpenVINO compilation helpers and the multi-stream runtime."""
