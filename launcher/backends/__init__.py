"""The explicit backend registry. Its keys must equal the backend names the recipe schema accepts."""

from launcher.backends.cpu import CpuBackend
from launcher.backends.cuda import CudaBackend
from launcher.backends.deepspeed import DeepSpeedBackend
from launcher.backends.mps import MpsBackend

BACKENDS = {b.name: b for b in (CpuBackend(), CudaBackend(), DeepSpeedBackend(), MpsBackend())}
