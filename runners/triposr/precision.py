"""TRIPOSR_PRECISION: the number formats a reconstruction runs in, for its two halves.

A reconstruction is the image-to-triplane network (one pass per batch), then the density grid (the decoder at R^3
points per scene). Points, triplane sampling, exp/sigmoid and the grid itself stay float32 in every mode (see
TripoSR.query): a bf16 coordinate would be off by up to a whole grid cell.

| mode    | network                                  | density grid's decoder            | on a CPU                        |
|---------|------------------------------------------|-----------------------------------|---------------------------------|
| `fp32`  | float32 products: the original's numbers | float32                           | the same                        |
| `mixed` | float32 with TF32 tensor-core products   | bf16 products, float32 sums       | float32 network, bf16 grid      |
| `bf16`  | bf16 autocast                            | bf16 products, float32 sums       | the same                        |

`auto` is `mixed` on a GPU and `fp32` on a CPU. TF32 exists on GPUs only, so on a CPU `mixed` runs the network in
plain float32. bf16 on a CPU needs native bf16 products, AMX (amx_bf16) or AVX512-BF16 (avx512_bf16), detected at
run time (cpu.bf16_support): without them `mixed` and `bf16` run fp32 there, with a warning in the log, since
PyTorch's emulated bf16 would be several times slower than fp32 and no more exact.

Chamfer distance to the fp32 mesh (model units; the issues' bar is 1e-3), official config with seeded random
weights, one picture, resolution 256, iso-level the 0.999 quantile of the fp32 grid:
- a GPU's modes, estimated by bench/triposr_precision_cpu.py (CPU autocast, TF32 emulated by rounding every
  product's inputs): bf16 network 1.0e-3, bf16 grid 5.9e-4, both 1.1e-3; a TF32 network 5.7e-5, and with the bf16
  grid (`mixed`) 5.6e-4.
- a CPU's, by bench/triposr_model_bench.py --device cpu --emulate-bf16 (cpu.py's grid; the backbone's residual stream
  kept float32, model.CPU_FLOAT32_RESIDUAL): `bf16` 8.2e-4, `mixed` 6.5e-4. Measured where PyTorch emulates bf16
  (no AMX here), which computes what AMX and AVX512-BF16 compute (bf16 products summed in float32) up to the order
  of the sums; not yet measured on such a CPU.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

MODES = ("auto", "fp32", "mixed", "bf16")
log = logging.getLogger("grok3d.triposr")


@dataclass(frozen=True)
class Precision:
    network: str  # "fp32" | "tf32" | "bf16"
    grid: str  # "fp32" | "bf16"


_PLANS = {"fp32": Precision("fp32", "fp32"), "mixed": Precision("tf32", "bf16"), "bf16": Precision("bf16", "bf16")}


def cpu_bf16() -> str | None:
    """The CPU's native bf16 products ('amx_bf16' or 'avx512_bf16'), or None: see cpu.bf16_support."""
    from runners.triposr.cpu import bf16_support

    return bf16_support()


def resolve(mode: str, device: torch.device, native_bf16: bool | None = None) -> Precision:
    """The number formats `mode` runs in on `device`.

    On a CPU, TF32 does not exist (`mixed`'s network runs float32), and bf16 runs only where the CPU multiplies it
    natively (native_bf16; None: detected by cpu_bf16()); elsewhere every bf16 part runs float32, with a warning
    in the log, since PyTorch's emulated bf16 is several times slower than float32 there and no more exact."""
    if mode == "auto":
        mode = "mixed" if device.type == "cuda" else "fp32"
    if mode not in _PLANS:
        raise ValueError(f"precision {mode!r}: use one of {', '.join(MODES)}")
    plan = _PLANS[mode]
    if device.type != "cpu":
        return plan
    plan = Precision("fp32" if plan.network == "tf32" else plan.network, plan.grid)
    if native_bf16 is None:
        native_bf16 = cpu_bf16() is not None
    if not native_bf16 and "bf16" in (plan.network, plan.grid):
        _warn_once(mode)
        plan = _PLANS["fp32"]
    return plan


@functools.lru_cache(maxsize=None)
def _warn_once(mode: str) -> None:
    log.warning("TRIPOSR_PRECISION=%s: this CPU has no native bf16 products (neither amx_bf16 nor avx512_bf16 "
                "detected), where PyTorch's emulated bf16 is slower than float32: running fp32", mode)


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
