"""Kernels: each op has `op_ref` (PyTorch, defines the semantics), `op_triton` and `op` (dispatch)."""
