"""Suite-wide settings.

torch runs single-threaded in tests: on these shared 2-core machines a small matmul with two
threads was measured 100x slower than with one (thread contention), and tests time behaviour, not
throughput. The setting is restored before every test because training code sets its own.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_torch_thread():
    torch.set_num_threads(1)
    yield
