"""The one tolerance table of the test suite.

fp64/fp32: the largest relative error against the float64 reference. A sum that cancels
(a norm of a d=p=1 layer is (sum_t a_t g_t)^2) has no float32 algorithm that reaches 1e-5 on
every input; there, and only where eager float32 PyTorch itself misses 1e-5, the kernel may
not exceed RATIO_LOWP times eager's error.
bf16/fp16: the kernel's error against float64 may be at most RATIO_LOWP times eager PyTorch's
error in the same dtype (flash-attention's rule), plus FLOOR_LOWP relative to the result,
which is float32 accumulation's own error (eager PyTorch can be exact by luck on tiny cases).
"""
import torch

REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
RATIO_LOWP = 2.0
FLOOR_LOWP = 1e-5
LOW_PRECISION = (torch.bfloat16, torch.float16)
