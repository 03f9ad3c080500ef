import pytest
import torch

from minigpt import resolve_device


def test_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and torch.backends.mps.is_available():
        expected = "mps"
    assert resolve_device("auto").type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:1", "CUDA:0"])
def test_missing_cuda_is_a_clear_error(name):
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device(name)


def test_missing_cuda_index_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="only 2 CUDA device"):
        resolve_device("cuda:2")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="checks the error without MPS")
def test_missing_mps_is_a_clear_error():
    with pytest.raises(ValueError, match="MPS is not available"):
        resolve_device("mps")


@pytest.mark.parametrize("name", ["gpu", "tpu:0", ""])
def test_unknown_device(name):
    with pytest.raises(ValueError, match="device"):
        resolve_device(name)
