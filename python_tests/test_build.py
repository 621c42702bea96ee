"""The compiled extension: what it reports, that CUDA kernels are built where they can be,
and that a missing build fails loudly."""
import os
import shutil
import subprocess
import sys
import textwrap

import torch

import bk_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_build_info_reports_the_build():
    info = bk_kernels.build_info()
    assert info["version"] == bk_kernels.__version__
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert info["openmp"] is True and info["omp_max_threads"] >= 1
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_archs"], "a CUDA build must say which architectures it holds"
        assert info["cuda_version"] == torch.version.cuda
    else:
        assert info["cuda_archs"] == []


def test_cuda_kernels_are_built_when_nvcc_is_present():
    """setup.py builds the CUDA kernels whenever torch has CUDA and nvcc is found."""
    have_nvcc = shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))
    if os.environ.get("BK_CUDA") == "0" or torch.version.cuda is None or not have_nvcc:
        assert os.environ.get("BK_CUDA") != "1"
        return
    info = bk_kernels.build_info()
    assert info["cuda"], "nvcc is on PATH and torch has CUDA, yet _C has no CUDA kernels"
    wanted = os.environ.get("BK_CUDA_ARCHS")
    if wanted and wanted != "native":
        assert info["cuda_archs"] == wanted.split(";")
    elif not wanted:  # the release list, whatever GPU the building machine has
        assert info["cuda_archs"] == ["8.0", "9.0+PTX"]


def test_extension_loads_without_torch_imported_first():
    """_C carries run paths to libtorch and (CUDA builds) libcudart: it loads in a process that
    has not imported torch and has no LD_LIBRARY_PATH."""
    so = [f for f in os.listdir(os.path.dirname(bk_kernels.__file__)) if f.startswith("_C") and f.endswith(".so")]
    path = os.path.join(os.path.dirname(bk_kernels.__file__), so[0])
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    code = "import ctypes, sys; ctypes.CDLL(sys.argv[1]); assert 'torch' not in sys.modules"
    run = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr


def test_ops_are_registered_with_the_dispatcher():
    for name in ("ghost_norm", "direct_norm", "clipped_sum", "clipped_sum_", "embedding_norm",
                 "embedding_clipped_sum", "embedding_clipped_sum_", "norm_layer_grads", "add_noise_"):
        op = getattr(torch.ops.bk, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU")
        if bk_kernels.build_info()["cuda"]:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA")


def test_import_without_the_extension_says_how_to_build(tmp_path):
    """A source tree without _C fails at import with instructions, not an obscure error."""
    shutil.copytree(os.path.join(ROOT, "bk_kernels"), tmp_path / "bk_kernels",
                    ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    # -S: no site hooks, so the editable install's finder cannot supply the built package;
    # torch is found by its folder alone.
    code = textwrap.dedent("""
        import sys
        sys.path[:0] = [sys.argv[1], sys.argv[2]]
        try:
            import bk_kernels
        except ImportError as err:
            print(err)
            sys.exit(3)
    """)
    site_packages = os.path.dirname(os.path.dirname(torch.__file__))
    run = subprocess.run([sys.executable, "-S", "-c", code, str(tmp_path), site_packages],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 3, run.stdout + run.stderr
    assert "make build" in run.stdout and "--no-build-isolation" in run.stdout
