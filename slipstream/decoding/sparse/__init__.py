"""Sparse-attention internals: the per-step plan, HiP and block top-k selectors, the backend."""
