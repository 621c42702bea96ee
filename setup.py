"""Builds bk_kernels._C: C++ CPU kernels always, CUDA kernels when torch has CUDA and nvcc is found.

Switches (environment variables):
  BK_CUDA=0          never build the CUDA kernels
  BK_CUDA=1          build them or fail loudly saying why
  BK_CUDA_ARCHS      CUDA architectures, e.g. "8.0;9.0" (default: the release list 8.0;9.0+PTX, so a
                     wheel built on any machine runs on every Ampere/Hopper GPU and JITs newer ones);
                     "native": only the local GPUs' (faster to build; what `make gpu-check` uses)
  CUDA_HOME          toolkit root (default: found from the nvcc on PATH, through any wrapper)
  MAX_JOBS           parallel compile jobs (default: limited by cores and memory)

Metadata and pinned dependencies live in pyproject.toml.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def log(msg):
    print(f"[bk_kernels setup] {msg}", file=sys.stderr)


def read_version():
    with open(os.path.join(ROOT, "bk_kernels", "version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def toolkit_root_of(nvcc):
    """The CUDA toolkit root that `nvcc` really runs from.

    /usr/local/bin/nvcc may be a wrapper script that execs the real one, so the folder above
    the wrapper is not the toolkit: ask nvcc itself (a dry-run compile prints TOP=<root>/bin/..;
    the source file need not exist).
    """
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "bk_probe.cu", "-o", os.devnull], capture_output=True, text=True,
                             timeout=60)
        text = out.stdout + out.stderr
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"TOP=(\S+)", text)
    if m:
        root = os.path.normpath(m.group(1))
        return os.path.dirname(root) if os.path.basename(root) == "bin" else root
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def find_cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home, None
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None, "nvcc was not found on PATH and CUDA_HOME is not set"
    root = toolkit_root_of(nvcc)
    if root is None or not os.path.exists(os.path.join(root, "bin", "nvcc")):
        return None, f"could not find the CUDA toolkit behind {nvcc}; set CUDA_HOME"
    return root, None


def cuda_archs():
    archs = os.environ.get("BK_CUDA_ARCHS", "").strip()
    if archs != "native":
        return archs or DEFAULT_CUDA_ARCHS
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("BK_CUDA_ARCHS=native needs a visible GPU; give the architectures, e.g. 9.0")
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}.{minor}" for major, minor in caps)


def runtime_library_path(with_cuda):
    """-rpath entries, so that _C finds libtorch/libc10 and libcudart without torch imported
    first and without LD_LIBRARY_PATH: next to an installed wheel ($ORIGIN/../torch/lib, the
    nvidia-* pip packages' lib folders), then the folders this build linked against (an
    editable install in a source tree)."""
    import torch

    dirs = ["$ORIGIN/../torch/lib"]
    if with_cuda:
        dirs += ["$ORIGIN/../nvidia/cu13/lib", "$ORIGIN/../nvidia/cuda_runtime/lib"]
    dirs.append(os.path.join(os.path.dirname(torch.__file__), "lib"))
    if with_cuda:
        dirs += nvidia_pip_dirs("lib")
    return [f"-Wl,-rpath,{d}" for d in dirs]


def want_cuda():
    """(build CUDA?, CUDA_HOME or None). Raises if BK_CUDA=1 and it cannot be built."""
    import torch

    switch = os.environ.get("BK_CUDA", "").strip()
    if switch == "0":
        log("BK_CUDA=0: building the CPU kernels only")
        return False, None
    reason = None
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} was built without CUDA"
        home = None
    else:
        home, reason = find_cuda_home()
    if reason is None:
        return True, home
    if switch == "1":
        raise RuntimeError(f"BK_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    log(f"building the CPU kernels only: {reason} (set BK_CUDA=1 to make this an error)")
    return False, None


def nvidia_pip_dirs(kind):
    """include/ or lib/ folders of the nvidia-* pip packages that torch's CUDA build brings."""
    site = sysconfig.get_paths()["purelib"]
    return sorted(d for d in glob.glob(os.path.join(site, "nvidia", "*", kind)) if os.path.isdir(d))


def limit_build_jobs():
    """Each compile of torch headers can take ~2 GiB: bound ninja's jobs by memory too."""
    if "MAX_JOBS" in os.environ:
        return
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8
    os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(mem_gib // 3))))


def extensions():
    with_cuda, cuda_home = want_cuda()
    if with_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME and TORCH_CUDA_ARCH_LIST when imported.
        os.environ["CUDA_HOME"] = cuda_home
        archs = cuda_archs()
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        log(f"building CUDA kernels with {cuda_home} for architectures {archs}")
    limit_build_jobs()
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-fopenmp", f'-DBK_VERSION="{read_version()}"']
    extra = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"] + runtime_library_path(with_cuda))
    if not with_cuda:
        return [CppExtension("bk_kernels._C", sources, extra_compile_args={"cxx": cxx_flags}, **extra)]
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    cxx_flags += ["-DBK_WITH_CUDA", f'-DBK_CUDA_ARCHS="{archs}"']
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    # The toolkit may lack headers and libraries that torch's CUDA build takes from the
    # nvidia-* pip packages (cublas, cusparse, ...). Search those only after the toolkit's own
    # folders: their cuda_runtime.h is not the one that matches nvcc.
    cxx_flags += [f"-idirafter{d}" for d in nvidia_pip_dirs("include")]
    extra["library_dirs"] = nvidia_pip_dirs("lib")
    return [CUDAExtension("bk_kernels._C", sources, extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                          **extra)]


def build_ext_class():
    """torch's BuildExtension with ninja, compiling into build/ext in the source tree whatever
    runs it (pip install -e ., pip wheel, setup.py build_ext): pip would otherwise compile in a
    fresh temporary folder every time. ninja then recompiles only the sources (and headers)
    that changed, or whose compile command did (another BK_CUDA_ARCHS, another torch)."""
    from torch.utils.cpp_extension import BuildExtension

    class BuildExt(BuildExtension.with_options(use_ninja=True)):
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(ROOT, "build", "ext")

    return BuildExt


def main():
    ext_modules = extensions()  # first: it sets CUDA_HOME before cpp_extension is imported
    setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext_class()})


if __name__ == "__main__":
    main()
