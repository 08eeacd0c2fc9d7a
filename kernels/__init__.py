"""Triton kernels for the GLM-4V vision tower (installed as glm4v_fast.kernels)."""
