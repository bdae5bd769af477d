import os

import pytest
import torch

# Several peers share this machine's cores in the multi-process tests.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def compiled_codec_loops():
    """The codecs' CPU loops compiled once (numba caches them on disk) before any test starts
    peers, so that peers started together load them instead of each compiling them."""
    from swarmnet.codecs import kernels

    kernels.warm_up()


@pytest.fixture
def anyio_backend():
    return "asyncio"
