import pytest
import torch

from minigpt.backends import keep_freed_memory
from minigpt.config import GPTConfig
from minigpt.tokenizer import get_tokenizer

keep_freed_memory()  # the tests allocate like training does; see its docstring


@pytest.fixture(scope="session")
def tokenizer():
    return get_tokenizer()


@pytest.fixture
def tiny_cfg() -> GPTConfig:
    """A model small enough for fast tests: 2 layers, 4 heads, 32 dims, 100-token vocab."""
    return GPTConfig(vocab_size=100, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One thread for a module of tiny models: they gain nothing from a second, and on a busy
    2-core machine lose a lot to it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
