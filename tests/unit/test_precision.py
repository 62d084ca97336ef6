"""``trainer.precision`` is a GPU switch: used on CUDA, ignored with a warning on the CPU.

The GPU half (bf16 really computes in bf16 and every family still learns) is
``tests/gpu/test_cuda_precision.py``, which runs only where CUDA is.
"""

from __future__ import annotations

import warnings

import pytest

from aigc.config import ConfigError, lightning_precision, load_config


def test_mixed_precision_is_ignored_on_cpu_with_a_warning() -> None:
    for requested in ("bf16-mixed", "16-mixed"):
        with pytest.warns(UserWarning, match=f"trainer.precision={requested} ignored on CPU"):
            assert lightning_precision(requested, use_gpu=False) == "32-true"


def test_precision_is_passed_through_on_gpu_without_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lightning_precision("bf16-mixed", use_gpu=True) == "bf16-mixed"
        assert lightning_precision("16-mixed", use_gpu=True) == "16-mixed"
        assert lightning_precision("32", use_gpu=True) == "32-true"
        assert lightning_precision("32", use_gpu=False) == "32-true"


def test_unknown_precision_names_the_key_and_the_allowed_values() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides=["trainer.precision=bf16"])
    message = str(err.value)
    assert "trainer.precision" in message and "bf16-mixed" in message and "16-mixed" in message
