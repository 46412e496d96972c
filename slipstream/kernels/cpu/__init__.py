"""C++ kernels for the CPU path, built on first use with the system compiler (build.py)."""
