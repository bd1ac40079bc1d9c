"""Suite-wide settings.

torch runs single-threaded in tests: on these shared 2-core machines a small matmul with two
threads was measured 100x slower than with one (thread contention), and tests time behaviour, not
throughput.
"""

import torch

torch.set_num_threads(1)
