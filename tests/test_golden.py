"""Seeded outputs of every head/denoiser/sampler must match the committed artifacts."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent / "golden"))
from cases import CASES, HERE, case_name, run_case  # noqa: E402


@pytest.mark.parametrize("case", CASES, ids=[case_name(*c) for c in CASES])
def test_golden(case):
    path = HERE / f"{case_name(*case)}.safetensors"
    assert path.exists(), f"missing golden artifact {path.name}: run python tests/golden/regenerate.py"
    expected = load_file(str(path))
    got = run_case(*case)
    assert set(got) == set(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-5, msg=f"{path.name}:{k} changed")
