"""CPU executor for the CUDA C++ kernels of csrc/ (see README.md)."""
