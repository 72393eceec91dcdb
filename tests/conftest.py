import os

import pytest
import torch

from tests.tiny import tiny_batch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    return tiny_batch()
