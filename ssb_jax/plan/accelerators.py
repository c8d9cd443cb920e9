"""The accelerators the planner knows: devices per host, memory, dense bfloat16 peak and memory bandwidth
per device (datasheet figures), and the JAX backend each runs. benchmarks/ reads the same table for the
ceilings it reports against."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Accelerator:
    devices: int          # devices one host (or slice) shows to JAX
    memory_gib: float     # per device
    bf16_tflops: float    # dense peak per device
    bandwidth_gbs: float  # memory bandwidth per device
    backend: str = "gpu"  # the JAX backend it runs (decides which kernel attention_impl="auto" resolves to)


ACCELERATORS = {
    "v4-8": Accelerator(4, 32, 275, 1228, "tpu"),
    "v5e-8": Accelerator(8, 16, 197, 819, "tpu"),
    "v5p-8": Accelerator(4, 95, 459, 2765, "tpu"),
    "v6e-8": Accelerator(8, 32, 918, 1640, "tpu"),
    "A100-40G": Accelerator(1, 40, 312, 1555),
    "A100-80G": Accelerator(1, 80, 312, 2039),
    "H100-80G": Accelerator(1, 80, 989, 3350),
    "H200": Accelerator(1, 141, 989, 4800),
    "T4": Accelerator(1, 15, 65, 320),
    "L4": Accelerator(1, 24, 121, 300),
}
