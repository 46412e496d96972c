"""Kernels: each op has `op_ref` (PyTorch, the semantics), `op_triton` and `op` (dispatch)."""
