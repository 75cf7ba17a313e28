import sys
from pathlib import Path

import pytest

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
def calib_file(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text"))
