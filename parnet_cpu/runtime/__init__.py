"""Torch-free inference side: OpenVINO compilation helpers and the multi-stream runtime."""

from parnet_cpu.runtime.runtime import Runtime, RuntimeClosedError  # noqa: E402

__all__ = ["Runtime", "RuntimeClosedError"]
