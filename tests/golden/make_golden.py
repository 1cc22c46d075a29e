"""Generate tests/golden/golden.npz: torch's float64 results over the parity grid in tests/cases.py.

    pip install torch==2.13.0 && python tests/golden/make_golden.py

For every case the file holds, under "<case id>/<name>": the state_dict ("param.<name>"), the input
"x", the initial state "h0"/"c0" (when given), the loss weights "R.<output>", the packed "lengths",
torch's outputs, the loss, and the gradients "grad.<leaf>" of the loss with respect to every parameter,
the input and the initial state; "<case id>/spec" is repr(case), so a grid edited without
regenerating the file fails the golden test instead of silently testing something else.
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cases  # noqa: E402

TORCH_VERSION = "2.13.0"
OUT = Path(__file__).with_name("golden.npz")


def main() -> None:
    import torch

    if torch.__version__.split("+")[0] != TORCH_VERSION:
        sys.exit(f"make_golden: needs torch=={TORCH_VERSION}, found {torch.__version__}")
    torch.set_num_threads(1)
    data = {"torch_version": np.array(torch.__version__)}
    for case in cases.CASES:
        arrays = cases.make_arrays(case, np.float64)
        data |= {f"{case.id}/{k}": v for k, v in arrays.items()}
        data |= {f"{case.id}/{k}": v for k, v in cases.torch_reference(case, arrays).items()}
        data[f"{case.id}/spec"] = np.array(repr(case))
    np.savez_compressed(OUT, **data)
    print(
        f"wrote {len(cases.CASES)} cases, {len(data)} arrays, {OUT.stat().st_size} bytes to {OUT}"
    )


if __name__ == "__main__":
    main()
