import os
import random

import numpy as np
import pytest
import torch


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
