"""What every emulated-kernel test module shares: its marks and the one-thread fixture.

    from cuda_emu.testing import one_thread, pytestmark  # noqa: F401
"""
import pytest
import torch

from . import driver

pytestmark = [pytest.mark.cuda_emulated,
              pytest.mark.skipif(driver.unavailable_reason() is not None,
                                 reason=str(driver.unavailable_reason()))]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The references run on small tensors, where intra-op threads only cost."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
