"""Triton kernels: AOT compilation for sm_90 of every kernel of every Triton module (no GPU
needed), with PTX and ptxas checks; and, for the norm kernels, tiny tiles, the pair-index
mapping, schema and fake tensors. Accuracy over shapes, dtypes and layouts is in test_norms.py
and test_triton_ops.py (in the interpreter without a GPU; conftest.py switches it on).
"""
import importlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch
import triton

from bk_kernels.ops import triton_norms as tn
from python_tests.ops.norm_checks import assert_norms_close

_MODULES = [
    "bk_kernels.ops.triton_norms",
    "bk_kernels.ops.triton_clipped_sum",
    "bk_kernels.ops.triton_embedding",
    "bk_kernels.ops.triton_norm_layer",
    "bk_kernels.ops.triton_noise",
]
_REPO = pathlib.Path(__file__).resolve().parents[2]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
NAMES = {"ghost": "ghost_norm", "direct": "direct_norm"}
OPS = {
    "ghost": lambda a, g: torch.ops.bk.ghost_norm_triton(a, g),
    "direct": lambda a, g: torch.ops.bk.direct_norm_triton(a, g),
}
LAUNCHERS = {"ghost": tn._launch_ghost, "direct": tn._launch_direct}


def randn(*shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)


# ---------------------------------------------------------------------------
# AOT compilation for sm_90
# ---------------------------------------------------------------------------

TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
SPECS = [spec for m in _MODULES for spec in importlib.import_module(m).aot_compile_specs()]
SPEC_NAMES = [name for name, *_ in SPECS]
DATA_PTRS = {"*fp32", "*fp64", "*fp16", "*bf16"}

# What each kernel's PTX must show: tl.dot (tensor cores for fp16/bf16), atomics (only the
# embedding's non-deterministic scatter keeps them: every reduction stores shares that are
# summed in a fixed order, so results are bitwise reproducible on a GPU).
KERNELS = {
    "_ghost_norm_kernel": {"dot": True, "atomic": False},
    "_direct_norm_kernel": {"dot": True, "atomic": False},
    "_clipped_sum_kernel": {"dot": True, "atomic": False},
    "_embedding_norm_kernel": {"dot": True, "atomic": False},
    "_embedding_scatter_kernel": {"dot": False, "atomic": True},
    "_embedding_segment_kernel": {"dot": False, "atomic": False},
    "_norm_layer_grads_kernel": {"dot": False, "atomic": False},
    "_add_noise_kernel": {"dot": False, "atomic": False},
}


def data_ptr_type(signature):
    """The floating-point data type of a spec: that of its activation/gradient tensor."""
    for key in ("a_ptr", "g_ptr", "x_ptr"):
        if key in signature:
            return signature[key]
    raise KeyError(signature)


# Compiling needs a process where triton.language was imported WITHOUT
# TRITON_INTERPRET=1: in interpreter mode triton's own @jit helpers (tl.cdiv, tl.sum,
# ...) are InterpretedFunctions and the code generator cannot lower calls to them. So
# every spec is compiled in a subprocess with TRITON_INTERPRET removed from its env.
# TRITON_DUMP_PTXAS_LOG=1 makes triton print ptxas -v (registers, spills) to stdout.
_AOT_SCRIPT = r"""
import contextlib, importlib, io, json, sys, time, traceback
out, names = sys.argv[1], sys.argv[2:]
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
results = {}
for name in names:
    for spec_name, kernel, signature, constexprs in importlib.import_module(name).aot_compile_specs():
        t0 = time.time()
        log = io.StringIO()
        try:
            src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
            with contextlib.redirect_stdout(log):
                c = triton.compile(src, target=GPUTarget("cuda", 90, 32))
            results[spec_name] = {"ok": True, "ptx": c.asm["ptx"], "cubin_bytes": len(c.asm["cubin"]),
                                  "ptxas_log": log.getvalue(), "seconds": time.time() - t0}
        except Exception:
            results[spec_name] = {"ok": False, "error": traceback.format_exc() + log.getvalue()}
with open(out, "w") as f:
    json.dump(results, f)
"""


def _ptxas_env():
    """triton's wheel bundles ptxas (triton/backends/nvidia/bin/ptxas); if it is
    missing, fall back to a CUDA toolkit's via TRITON_PTXAS_PATH."""
    bundled = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if os.environ.get("TRITON_PTXAS_PATH") or os.access(bundled, os.X_OK):
        return {}
    candidates = [shutil.which("ptxas")] + sorted(
        str(p) for p in pathlib.Path("/usr/local").glob("cuda*/bin/ptxas")
    )
    for cand in candidates:
        if cand and os.access(cand, os.X_OK):
            return {"TRITON_PTXAS_PATH": cand}
    pytest.fail(
        "no ptxas: triton's bundled one is missing and none was found on PATH or in "
        "/usr/local/cuda*/bin; set TRITON_PTXAS_PATH"
    )


@pytest.fixture(scope="module")
def aot_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("triton_aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(_ptxas_env())
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")  # fresh cache: really run every stage
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO), env.get("PYTHONPATH")]))
    out = tmp / "results.json"
    proc = subprocess.run(
        [sys.executable, "-c", _AOT_SCRIPT, str(out), *_MODULES],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"AOT subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(out.read_text())


def test_specs_cover_every_kernel_and_dtype():
    seen = {(k.__name__, data_ptr_type(sig)) for _, k, sig, _ in SPECS}
    assert seen == {(k, p) for k in KERNELS for p in DATA_PTRS}
    assert len(set(SPEC_NAMES)) == len(SPECS)
    for name, kernel, sig, constexprs in SPECS:
        assert isinstance(kernel, triton.runtime.jit.JITFunction), name
        assert list(sig) == kernel.arg_names, name
        assert {k for k, v in sig.items() if v == "constexpr"} == set(constexprs), name


SPEC_BY_NAME = {name: (kernel, sig, constexprs) for name, kernel, sig, constexprs in SPECS}


def ptxas_usage(log):
    """(registers, spill store bytes, spill load bytes) from a ptxas -v log."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert regs and spills, f"no ptxas -v report in:\n{log}"
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_aot_compile_sm90(name, aot_results):
    res = aot_results[name]
    assert res["ok"], f"{name} failed to compile for sm_90:\n{res['error']}"
    assert res["cubin_bytes"] > 0, name
    kernel, sig, _ = SPEC_BY_NAME[name]
    traits = KERNELS[kernel.__name__]
    ptx = res["ptx"]
    assert ".target sm_90" in ptx, name
    assert ("atom.global" in ptx) == traits["atomic"], name
    ty = data_ptr_type(sig)
    acc = ".f64" if ty == "*fp64" else ".f32"
    if traits["atomic"]:
        assert f".add{acc}" in ptx, name
    if ty == "*fp32":
        assert "tf32" not in ptx, f"{name}: fp32 must use IEEE dots, not TF32"
    if traits["dot"] and ty in ("*fp16", "*bf16"):
        assert "mma" in ptx, f"{name}: fp16/bf16 dots should use tensor cores"
    if traits["dot"] and ty == "*fp64":
        assert ".f64" in ptx, name
    if not traits["dot"]:
        assert "mma" not in ptx, name
    if not traits["atomic"]:
        assert "st.global" in ptx, name
    if kernel.__name__ == "_add_noise_kernel":
        assert "mul.hi.u32" in ptx, f"{name}: Philox needs 32-bit mulhi"
    regs, spill_st, spill_ld = ptxas_usage(res["ptxas_log"])
    if TRITON_VERSION >= (3, 8):  # Triton 3.6 (`make triton-compat`) spills 8 bytes in two fp64 tiles
        assert spill_st == 0 and spill_ld == 0, f"{name}: {regs} registers, spills {spill_st}/{spill_ld} bytes"


# ---------------------------------------------------------------------------
# Numerics
# ---------------------------------------------------------------------------


# Tiny tiles: many T blocks (off-diagonal pairs, pair-index inversion), several
# reduction chunks and d/p blocks, all masked at the edges.
SMALL = {
    "ghost": {"BLOCK_T": 16, "BLOCK_KA": 16, "BLOCK_KG": 16},
    "direct": {"BLOCK_T": 16, "BLOCK_D": 16, "BLOCK_P": 16},
}


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_small_tiles(dtype, op):
    for T, d, p in ((130, 40, 20), (33, 17, 1)):
        a = randn(2, T, d, dtype=dtype, seed=T)
        g = randn(2, T, p, dtype=dtype, seed=T + 1)
        out = LAUNCHERS[op](a, g, SMALL[op])
        assert_norms_close(NAMES[op], out.cpu(), a.cpu(), g.cpu())


def test_pair_index_inversion():
    """The ghost kernel maps pair -> (sb <= tb) via tb = floor((sqrt(8 pair + 1) - 1) / 2)
    in fp32 plus a +-1 integer fix-up. Check it on every pair of the first 1024 rows and
    on the row boundaries of rows up to ~23k (pair indices up to ~2^28), also with the
    sqrt perturbed by a few ulp (the GPU uses sqrt.approx.ftz.f32)."""
    np = pytest.importorskip("numpy")
    small = np.arange(1024, dtype=np.int64)
    rows_small = np.repeat(small, small + 1)
    sb_small = np.concatenate([np.arange(r + 1, dtype=np.int64) for r in small])
    big = np.random.default_rng(0).integers(1024, 23170, size=20000).astype(np.int64)
    rows_big = np.repeat(big, 5)
    sb_big = np.stack([np.zeros_like(big), np.ones_like(big), big // 2, big - 1, big], 1).ravel()
    tb_true = np.concatenate([rows_small, rows_big])
    sb_true = np.concatenate([sb_small, sb_big])
    pair = tb_true * (tb_true + 1) // 2 + sb_true
    root = np.sqrt((8 * pair + 1).astype(np.float32))
    for ulps in (-4, -1, 0, 1, 4):
        r = root
        for _ in range(abs(ulps)):
            r = np.nextafter(r, np.float32(np.inf if ulps > 0 else -np.inf))
        tb = ((r - np.float32(1.0)) * np.float32(0.5)).astype(np.int64)
        tb = np.where(tb * (tb + 1) // 2 > pair, tb - 1, tb)
        tb = np.where((tb + 1) * (tb + 2) // 2 <= pair, tb + 1, tb)
        sb = pair - tb * (tb + 1) // 2
        assert (tb == tb_true).all() and (sb == sb_true).all(), ulps


def test_registered_schema():
    for name in ("ghost_norm_triton", "direct_norm_triton"):
        schema = str(getattr(torch.ops.bk, name).default._schema)
        assert schema == f"bk::{name}(Tensor a, Tensor g) -> Tensor", schema


@pytest.mark.parametrize("op", sorted(OPS))
def test_fake_tensor(op):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a = torch.empty(3, 7, 5, dtype=torch.bfloat16, device=DEVICE)
        g = torch.empty(3, 7, 2, dtype=torch.bfloat16, device=DEVICE)
        out = OPS[op](a, g)
        assert out.shape == (3,) and out.dtype == torch.float32
        out64 = OPS[op](a.double(), g.double())
        assert out64.dtype == torch.float64
