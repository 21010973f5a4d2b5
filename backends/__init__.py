"""The explicit backend registry. Its keys must equal the backend names the recipe schema accepts."""

from backends.cpu import CpuBackend
from backends.cuda import CudaBackend
from backends.deepspeed import DeepSpeedBackend
from backends.mps import MpsBackend

BACKENDS = {b.name: b for b in (CpuBackend(), CudaBackend(), DeepSpeedBackend(), MpsBackend())}
