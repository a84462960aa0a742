import pytest
import torch

# CUDA variants of every device-parametrised test: they run wherever a GPU is, skip elsewhere.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ],
    ),
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    import ossrl
    from ossrl import _C

    return f"ossrl {ossrl.__version__} from {ossrl.__file__}; CUDA kernels: {_C.with_cuda} {_C.cuda_archs}"
