"""Suite-wide test settings.

The models in the tests are tiny: one intra-op thread is faster than several (thread start-up and
synchronisation dominate), and the suite stays predictable on a shared 2-core CI machine.
"""

import torch


def pytest_configure(config):
    torch.set_num_threads(1)
