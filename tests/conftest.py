import random

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, so a failure reproduces."""
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
