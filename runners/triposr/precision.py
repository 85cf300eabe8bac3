"""TRIPOSR_PRECISION: the number formats a reconstruction runs in, for its two halves.

A reconstruction is the image-to-triplane network (one pass per batch), then the density grid (the decoder at R^3
points per scene). Points, triplane sampling, exp/sigmoid and the grid itself stay float32 in every mode (see
TripoSR.query): a bf16 coordinate would be off by up to a whole grid cell.

| mode    | network                                  | density grid's decoder            |
|---------|------------------------------------------|-----------------------------------|
| `fp32`  | float32 products: the original's numbers | float32                           |
| `mixed` | float32 with TF32 tensor-core products   | bf16 products, float32 sums       |
| `bf16`  | bf16 autocast                            | bf16 products, float32 sums       |

`auto` is `mixed` on a GPU and `fp32` on a CPU. TF32 exists on GPUs only, so on a CPU `mixed` runs the network in
plain float32. Why `mixed` (bench/triposr_precision_cpu.py, random official weights, resolution 256, Chamfer distance
to the fp32 mesh; the issue's bar is 1e-3): bf16 network 1.0e-3, bf16 grid 5.9e-4, both 1.1e-3; a TF32 network
(emulated by rounding every product's inputs) 5.7e-5, and with the bf16 grid (`mixed`) 5.6e-4.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

MODES = ("auto", "fp32", "mixed", "bf16")


@dataclass(frozen=True)
class Precision:
    network: str  # "fp32" | "tf32" | "bf16"
    grid: str  # "fp32" | "bf16"


_PLANS = {"fp32": Precision("fp32", "fp32"), "mixed": Precision("tf32", "bf16"), "bf16": Precision("bf16", "bf16")}


def resolve(mode: str, device: torch.device) -> Precision:
    if mode == "auto":
        mode = "mixed" if device.type == "cuda" else "fp32"
    if mode not in _PLANS:
        raise ValueError(f"precision {mode!r}: use one of {', '.join(MODES)}")
    return _PLANS[mode]


_flags_lock = threading.Lock()
_flag_users: list[str] = []  # the kinds of the fp32/tf32 blocks now running, in any thread
_flags_before: tuple[bool, bool] | None = None


def _tf32_flags(on: bool) -> None:
    # PyTorch lets cuDNN convolutions use TF32 by default; strict fp32 turns that off too.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on


@contextmanager
def number_format(kind: str, device: torch.device) -> Iterator[None]:
    """Run the block's matrix products in `kind`: fp32 (strict), tf32 (CUDA's TF32 tensor cores) or bf16.

    bf16 is autocast, per thread. fp32 and tf32 set PyTorch's TF32 flags, which are process-wide: blocks of the
    same kind may overlap in several threads; one of the other kind meanwhile is an error (a service runs every
    batch in the one mode its settings name). The flags are put back when the last such block ends."""
    if kind == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
        return
    global _flags_before
    with _flags_lock:
        if _flag_users and _flag_users[0] != kind:
            raise RuntimeError(f"a {kind} block while a {_flag_users[0]} block runs: TF32 is set process-wide")
        if not _flag_users:
            _flags_before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
            _tf32_flags(kind == "tf32")
        _flag_users.append(kind)
    try:
        yield
    finally:
        with _flags_lock:
            _flag_users.pop()
            if not _flag_users:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = _flags_before
