import os

import pytest
import torch

# Several peers share this machine's cores in the multi-process tests.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def anyio_backend():
    return "asyncio"
