"""Suite-wide test settings.

The models in the tests are tiny: one intra-op thread is faster than several (thread start-up and
synchronisation dominate, and spinning workers fight other processes on a shared 2-core CI machine).
It is reset before every test, since CLI entry points under test may set their own thread count.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)
    yield
