"""Torch-free inference side: OpenVINO compilation helpers and the multi-stream runtime."""

from parnet_cpu.runtime.runtime import (InferenceTimeout, Runtime, RuntimeBrokenError,  # noqa: E402
                                       RuntimeClosedError, StageError)

__all__ = ["InferenceTimeout", "Runtime", "RuntimeBrokenError", "RuntimeClosedError", "StageError"]
