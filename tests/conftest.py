import os
import shutil
from pathlib import Path

import pytest
import torch

from grokquant.grok.synth import synth


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """`eval` keeps its resume work in the user's cache: the tests' (and their subprocesses') go elsewhere."""
    os.environ["GROKQUANT_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_tp8(tmp_path_factory) -> Path:
    return synth(tmp_path_factory.mktemp("ckpt") / "tiny-tp8", "tiny", seed=1)


@pytest.fixture(scope="session")
def tiny_merged(tmp_path_factory) -> Path:
    return synth(tmp_path_factory.mktemp("ckpt") / "tiny-merged", "tiny", seed=1, layout="merged")


@pytest.fixture(scope="session")
def odd_tp8(tmp_path_factory) -> Path:
    return synth(tmp_path_factory.mktemp("ckpt") / "odd-tp8", "odd", seed=2)


# Wide experts: one layer (~27M parameters) dominates everything else; slow enough to interrupt.
WIDE = dict(hidden_size=256, moe_intermediate_size=4096, intermediate_size=2048, vocab_size=512)


@pytest.fixture(scope="session")
def wide_tp8(tmp_path_factory) -> Path:
    return synth(tmp_path_factory.mktemp("ckpt") / "wide-tp8", "tiny", seed=3, num_hidden_layers=2, **WIDE)


@pytest.fixture
def tiny_copy(tiny_tp8, tmp_path) -> Path:
    """A private copy of the tiny checkpoint that a test may damage."""
    dst = tmp_path / "copy"
    shutil.copytree(tiny_tp8, dst)
    return dst


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices and searches of many small ops: on a busy 2-core machine OpenMP barriers make two
    threads slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
