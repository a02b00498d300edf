"""Rewrite the golden artifacts: run only after an intended change to a head, denoiser or sampler."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from cases import CASES, HERE, case_name, run_case  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

if __name__ == "__main__":
    for case in CASES:
        out = HERE / f"{case_name(*case)}.safetensors"
        save_file(run_case(*case), str(out))
        print("wrote", out)
