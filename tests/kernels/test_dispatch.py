"""The `kernels` package: dispatch policy, and no clash with Hugging Face's optional `kernels`."""

import logging

import pytest
import torch

import kernels


def test_transformers_does_not_mistake_ours_for_hf_kernels():
    from transformers.utils import is_kernels_available

    assert kernels.__file__.endswith("kernels/__init__.py")
    assert is_kernels_available() is False


def test_wb_kernels_setting(monkeypatch):
    monkeypatch.setenv("WB_KERNELS", "REF ")
    assert kernels.requested_backend() == "ref" and kernels.backend() == "ref"
    monkeypatch.setenv("WB_KERNELS", "cuda")
    with pytest.raises(ValueError, match="WB_KERNELS='cuda'; expected one of auto, ref, triton"):
        kernels.backend()


def test_use_triton_policy_on_cpu_tensors(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_announced", set())
    x = torch.zeros(2)
    monkeypatch.setenv("WB_KERNELS", "auto")
    with caplog.at_level(logging.INFO, logger="kernels"):
        assert kernels.use_triton("op", x) is (torch.cuda.is_available() and x.is_cuda)
        kernels.use_triton("op", x)
    assert caplog.text.count("op: using the torch (ref) path") == 1  # once per op and path
    monkeypatch.setenv("WB_KERNELS", "triton")
    assert kernels.use_triton("op", x) is True  # conftest turns the interpreter on
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="op: WB_KERNELS=triton with CPU tensors needs TRITON_INTERPRET=1"):
        kernels.use_triton("op", x)


def test_a_shadowing_kernels_package_is_a_clear_error(monkeypatch, tmp_path, capsys):
    """Hugging Face's `kernels` (required by transformers >= 5.25) takes the same top-level name."""
    import importlib.machinery
    import importlib.util

    from workbench import device
    from workbench.cli import main

    device.check_kernels_package()  # ours is the one found here
    theirs = tmp_path / "site-packages" / "kernels" / "__init__.py"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: importlib.machinery.ModuleSpec(
        name, None, origin=str(theirs)) if name == "kernels" else real(name, *a))
    assert main(["doctor"]) == 2
    err = capsys.readouterr().err
    assert str(theirs.parent) in err and "pip uninstall kernels" in err and "Traceback" not in err
