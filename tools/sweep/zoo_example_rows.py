"""bk.verify with engine.example_rows over every model of the test zoo (python_tests/zoo.py):
4 rows as 2 examples of 2 rows each, laid out interleaved (bk.interleaved_rows(2)) and stacked
(bk.stacked_rows(2)); the loss is the mean over rows, which is the mean over examples of each
example's mean over its rows. One line per model and layout.

    python tools/sweep/zoo_example_rows.py            # ~2 min on 2 cores
"""
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
warnings.filterwarnings("ignore")

import bk_kernels as bk  # noqa: E402
from python_tests import zoo  # noqa: E402


def main():
    bad = 0
    for name, (build, loss, batch) in zoo.ZOO.items():
        for layout, rows in (("interleaved", bk.interleaved_rows(2)), ("stacked", bk.stacked_rows(2))):
            started = time.time()
            try:
                torch.manual_seed(0)
                report = bk.verify(build(), lambda m, b: loss(m, b).mean(), batch(4), example_rows=rows)
                status = f"{'OK' if report.ok else 'MISMATCH'} norm {report.norm_error:.1e} update " \
                         f"{report.update_error:.1e}"
                bad += not report.ok
            except Exception as err:  # noqa: BLE001  (a line per model, whatever it raises)
                status = f"ERROR {type(err).__name__}: {str(err)[:200]}"
                bad += 1
            print(f"{name:28s} {layout:12s} {time.time() - started:5.1f}s {status}", flush=True)
    print(f"{bad} not OK")


if __name__ == "__main__":
    main()
