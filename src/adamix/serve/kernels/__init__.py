"""C kernels for low-bit factors (lowbit.c), built with the system compiler on first use (native.py)
and wrapped for torch tensors (lowbit.py)."""
