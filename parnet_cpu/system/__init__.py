"""What the machine offers: CPU topology, NUMA, cgroup limits and ISA (see `cpuinfo`).

Torch-free on purpose: the runtime and the server use it to place inference streams on cores.
"""
