"""Torch-free inference side: OpenVINO compilation helpers and the multi-stream runtime.

`runtime.Runtime` runs a plan (`plan.Plan`: single graph, or the streams on their own core groups, chosen
by `plan.make_plan` and, for `plan="auto"`, `plan.PlanCache`) on worker processes (`worker`) that run
stages cut from the IR (`partition`), compiled by `engine`; `cores` sizes and places core groups, `leases`
holds them machine-wide.
"""

from parnet_cpu.runtime.leases import LeaseDirError  # noqa: E402
from parnet_cpu.runtime.runtime import (InferenceTimeout, InputError, Runtime, RuntimeBrokenError,  # noqa: E402
                                       RuntimeClosedError, RuntimeForkedError, SharedMemoryError, StageError)

__all__ = ["InferenceTimeout", "InputError", "LeaseDirError", "Runtime", "RuntimeBrokenError", "RuntimeClosedError",
           "RuntimeForkedError", "SharedMemoryError", "StageError"]
