import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, torch.get_num_threads()))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-size parity tests (seconds to a minute each on 2 CPU cores)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
