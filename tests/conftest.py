import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from synthetic import make_pair, write_text  # noqa: E402


@pytest.fixture(scope="session")
def bert_pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("bert"), "bert")


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def gpt2_pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("gpt2"), "gpt2")


@pytest.fixture(scope="session")
def deep_pair(tmp_path_factory):
    """A 6-block llama pair: enough blocks to interrupt a run midway (resume, Ray)."""
    return make_pair(tmp_path_factory.mktemp("deep"), "llama", layers=6)


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def single_thread():
    """For modules of tiny tensors: intra-op threads only add overhead (a lot on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def data_free_delta(pair, tmp_path_factory):
    """A ratio-1/8 data-free artifact of `pair` (read-only: tests that edit it work on a copy)."""
    import adamix
    base, ft = pair
    out = tmp_path_factory.mktemp("delta") / "d"
    adamix.compress(base, ft, out, ratio="1/8", calib=None, progress=False)
    return out


@pytest.fixture(scope="session")
def bert_delta(bert_pair, tmp_path_factory):
    return data_free_delta(bert_pair, tmp_path_factory)


@pytest.fixture(scope="session")
def llama_delta(llama_pair, tmp_path_factory):
    return data_free_delta(llama_pair, tmp_path_factory)
