"""bk_kernels: fused Book-Keeping kernels for differentially private training in PyTorch.

Importing this package loads the compiled extension `bk_kernels._C`, which registers the
`torch.ops.bk.*` ops with the dispatcher (CPU always; CUDA when it was compiled in).
"""
import torch  # noqa: F401  (loads libtorch before the extension that links against it)

from .version import __version__

try:
    from . import _C
except ImportError as err:  # fail loudly, saying how to fix it
    raise ImportError(
        "bk_kernels._C, the compiled extension, is missing or does not load "
        f"({err}). Build it with `make build`, or `pip install --no-build-isolation -e .` "
        "in an environment that has torch==2.14.1; set BK_CUDA=0 to build the CPU kernels "
        "only, BK_CUDA=1 to require the CUDA kernels."
    ) from err

from . import accounting, clipping, data, distributed, nn, ops  # noqa: E402
from .convert import UnsupportedModuleError, convert, generic_modules  # noqa: E402
from .batchnorm import freeze_batchnorm, replace_batchnorm  # noqa: E402
from .nn.families import register_layer  # noqa: E402
from .engine import PrivacyEngine, UnsupportedLayoutError  # noqa: E402
from .example_rows import interleaved_rows, stacked_rows  # noqa: E402
from .packed import packed_sequences  # noqa: E402
from .sampling_check import SamplingWarning  # noqa: E402
from .verify import VerifyReport, verify  # noqa: E402


def build_info():
    """What the compiled extension holds: version, torch_version, cuda (bool), cuda_version,
    cuda_archs (list of "major.minor"), openmp (bool), omp_max_threads."""
    return dict(_C.build_info())


__all__ = ["PrivacyEngine", "SamplingWarning", "UnsupportedLayoutError", "UnsupportedModuleError", "__version__", "accounting", "build_info", "clipping",
           "convert", "data", "generic_modules", "distributed", "interleaved_rows", "nn", "ops", "packed_sequences", "register_layer", "freeze_batchnorm", "replace_batchnorm", "stacked_rows", "verify", "VerifyReport"]
