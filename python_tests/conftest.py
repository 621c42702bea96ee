"""Test set-up shared by every test module.

Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter, which must be
switched on before any kernel is defined.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import bk_kernels  # noqa: E402,F401  (fails loudly if the extension is not built)


def pytest_report_header(config):
    info = bk_kernels.build_info()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return [f"bk_kernels {info['version']} build: {info}", f"GPU: {gpu}"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
