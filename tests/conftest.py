"""Set-up shared by every test module, run before any of them imports torch.

MKL_CBWR: the `pss` command sets MKL's conditional numerical reproducibility before torch loads
MKL (pss_cli/app.py: reproducible_blas), and docs/scan.md "Reproducibility" makes its promises
of identical results across thread counts and batch sizes with it set. The in-process tests
check those promises as the command gives them, so the test session sets it the same way (a
value already in the environment is kept). Without it, on MKL's AVX2 code path (an Intel Xeon
under MKL_ENABLE_INSTRUCTIONS=AVX2), MKL's batched products in the Krylov bookkeeping gave
a matrix other last bits beside other matrices than alone, and with bf16 products its values
then moved by up to 8e-4 (tests/test_precision.py::test_bf16_batched_equals_looped).
"""

import os

from pss_cli.app import reproducible_blas

reproducible_blas(os.environ)
