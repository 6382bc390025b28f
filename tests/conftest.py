"""Test configuration.

Without a GPU, Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 must be set
before pcd_kernels' Triton kernels are first imported, so it is set here, before anything else.
On a CUDA machine the same tests run the kernels on the GPU instead (and bfloat16 with them).

Inputs are fresh random numbers every run; the seed is printed in the header and in every
failure, and PCD_TEST_SEED=<seed> reproduces a run.
"""
import os
import random
import tempfile
import zlib

import pytest
import torch

# Importing torch does not import pcd_kernels' Triton kernels, so it is not too late for this.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU, tuning every kernel variant the suite compiles would take far longer than the tests:
# they use each kernel's first configuration (the benchmark tunes).
os.environ.setdefault("PCD_KERNELS_AUTOTUNE", "0")

SEED = int(os.environ.get("PCD_TEST_SEED", random.randrange(2**31)))


def inductor_cache_dir(capability: str) -> str:
    """torch's inductor caches the C++ it compiles without the instruction set in the key: code
    written at one ATEN_CPU_CAPABILITY and reloaded at another fails to compile (at::vec undeclared)
    or crashes. The suite keeps one cache per setting."""
    return os.path.join(tempfile.gettempdir(), f"torchinductor_pcd_kernels_{capability.lower()}")


os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", inductor_cache_dir(torch.backends.cpu.get_cpu_capability()))


def pytest_report_header(config):
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return [f"pcd_kernels tests: seed {SEED} (PCD_TEST_SEED={SEED} reproduces), CUDA device: {cuda}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"]


@pytest.fixture(autouse=True)
def _seed(request):
    seed = (SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31  # hash() differs per process
    torch.manual_seed(seed)
    random.seed(seed)
    yield


# PCD_KERNELS_POISON_CUDA=1 (make gpu-smoke sets it): before each test, blocks of the CUDA caching
# allocator are filled with 0xFF bytes (NaN in every float dtype) and released to its cache, so an
# output the kernels forget to write comes back NaN instead of a lucky zero.
POISON_CUDA = os.environ.get("PCD_KERNELS_POISON_CUDA") == "1" and torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _poison_cuda_memory():
    if POISON_CUDA:
        # Small tensors come from the allocator's small pool (blocks up to 1 MiB), large ones from
        # its large pool: poison both.
        blocks = [torch.empty(size, dtype=torch.uint8, device="cuda").fill_(255)
                  for size in [2**10] * 64 + [2**16] * 64 + [2**20] * 64 + [2**26] * 8]
        del blocks
    yield


def pytest_runtest_makereport(item, call):
    if call.excinfo is not None and call.when == "call":
        item.add_report_section("call", "seed", f"PCD_TEST_SEED={SEED}")
