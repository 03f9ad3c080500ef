import pytest
import torch

from minigpt.device import DTYPES, resolve_device, to_device, use_fast_matmul


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


def test_fast_matmul_only_touches_cuda_settings(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert not use_fast_matmul(torch.device("cpu"))
    assert not torch.backends.cuda.matmul.allow_tf32
    # Setting the flags needs no GPU, so the CUDA branch is checked here too.
    assert use_fast_matmul(torch.device("cuda"))
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def test_to_device_pins_and_copies_without_blocking_only_for_cuda(monkeypatch):
    calls = []

    class Recorder(torch.Tensor):
        def pin_memory(self, *args):
            calls.append("pin")
            return self

        def to(self, *args, **kwargs):
            calls.append(("to", args, kwargs))
            return self

    t = torch.arange(4).as_subclass(Recorder)
    to_device(t, torch.device("cuda:0"))
    assert calls == ["pin", ("to", (torch.device("cuda:0"),), {"non_blocking": True})]
    calls.clear()
    assert torch.equal(to_device(torch.arange(4), torch.device("cpu")), torch.arange(4))
    to_device(t, torch.device("cpu"))
    assert calls == [("to", (torch.device("cpu"),), {})]


def test_dtypes_are_the_commands_choices():
    assert DTYPES == {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
