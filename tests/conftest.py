import os
import random

import torch

# Triton reads TRITON_INTERPRET when it is first imported, and any test module may import it first: without
# a GPU, run the Triton kernels on CPU tensors through the interpreter for the whole session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    from capsparse.backends import available_backends

    lines = [f"torch {torch.__version__}, threads {torch.get_num_threads()}"]
    for name, (ok, reason) in available_backends().items():
        lines.append(f"capsparse backend {name}: {'available' if ok else 'unavailable (' + reason + ')'}")
    return lines
