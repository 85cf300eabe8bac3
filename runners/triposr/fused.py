"""The density grid's decoder as one Triton kernel: the GPU path of TripoSR.density_grid under bf16.

Why: at resolution 256 the grid is 16.7M points per scene, and in plain PyTorch each of the decoder's nine layers
writes its [points, 64] activations to GPU memory and reads them back (twice with the SiLU): that traffic, not the
arithmetic, is the grid's cost. Here each program takes a block of grid points, sums the three planes' projected
first-layer features (model.density_grid computes them, [B, R, R, n] each), and runs every hidden layer in
registers with bf16 tensor-core products accumulated in float32; only the density leaves the chip.

The same numbers as PyTorch's bf16 path up to rounding (each layer's output stays float32 here, where autocast
rounds it to bf16). Triton is the compiler PyTorch's CUDA builds ship with; where it is missing, or the kernel fails
its check against PyTorch when a model loads on a GPU, density_grid keeps the PyTorch path. The tests run this
kernel on the CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import logging
import os
import threading

import torch

log = logging.getLogger("grok3d.triposr")

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: density_grid stays on PyTorch
    triton = None

_disabled: str | None = None if triton is not None else "triton is not installed"
_checked: set[str] = set()  # devices whose check has run
_check_lock = threading.Lock()
BLOCK = 128  # grid points per program: 128 x 64 float32 activations fit in registers with room for a product
MAX_RESOLUTION = 1024  # flat grid indices are int32 in the kernel: R^3 must stay below 2^31


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def fits(width: int) -> bool:
    """Triton's products need power-of-two sizes of at least 16 (the official decoder is 64 wide)."""
    return width >= 16 and width & (width - 1) == 0


def usable(decoder: torch.nn.Module, device: torch.device) -> bool:
    """Whether density_grid may use the kernel: on CUDA (or anywhere under the interpreter), once it has passed
    its check on this device; the first call runs the check (and compiles the kernel every resolution uses)."""
    if _disabled is not None or not (device.type == "cuda" or interpreting()):
        return False
    if not fits(decoder.layers[0].out_features):
        return False
    with _check_lock:  # a second caller waits for the first one's verdict
        if str(device) not in _checked:
            _check(decoder, device)
            _checked.add(str(device))
    return _disabled is None


def state(device: torch.device) -> str:
    """'on', or why the kernel is off on this device (for benches and logs)."""
    if _disabled is not None:
        return f"off: {_disabled}"
    return "on" if device.type == "cuda" or interpreting() else f"off: {device.type} device"


def disable(reason: str) -> None:
    global _disabled
    _disabled = reason
    log.warning("Fused density grid off, PyTorch path instead: %s", reason)


@torch.no_grad()
def _check(decoder: torch.nn.Module, device: torch.device) -> None:
    """The kernel against the same MLP in float32 PyTorch on a small random grid; an error or a mismatch beyond
    bf16 rounding turns the kernel off for this process (the grid then takes the PyTorch path).

    Two scenes and R = 17 (17^3 is no multiple of BLOCK): the per-scene offsets and the last, partial block run
    too. The resolution is a run-time argument, so this compiles the same kernel the service's grids use."""
    width, r = decoder.layers[0].out_features, 17
    gen = torch.Generator(device="cpu").manual_seed(0)
    xy, xz, yz = (torch.randn(2, r, r, width, generator=gen).to(device) for _ in range(3))
    try:
        with torch.autocast(device.type, enabled=False):
            got = density(xy, xz, yz, decoder, 0.0).log()  # raw outputs, |raw| far below exp's float32 limit
            pre = xy[:, :, :, None] + xz[:, :, None] + yz[:, None]
            want = decoder.layers[1:](pre.to(decoder.layers[0].weight.dtype))[..., 0].float()
        error = float((got - want).abs().max()) / max(1.0, float(want.abs().max()))
    except Exception as exc:  # a Triton or driver version this kernel does not compile for
        disable(f"{type(exc).__name__}: {exc}")
        return
    if not error < 0.02:
        disable(f"its densities differ from PyTorch's by {error:.3g} (log scale, relative to the largest)")
    else:
        log.info("Fused density grid on %s (raw output error %.2g of the largest, against float32)", device, error)


if triton is not None:
    # The kernel calls only Triton's builtins and jit functions of this module: Triton's own jit helpers
    # (tl.sigmoid, tl.sum) stay compiled-mode objects once triton is imported without TRITON_INTERPRET, and the
    # interpreter refuses to call those (the tests turn the interpreter on after triton is imported). The one
    # exception, tl.standard._sum_combine, is never called by the interpreter: it recognises it and sums in numpy.

    @triton.jit
    def _silu(x):
        return x / (1.0 + tl.exp(-x))

    # R is a run-time argument that Triton must not specialise (it would compile apart for R % 16 == 0): the
    # check's small grid and the service's grids then share one compiled kernel.
    @triton.jit(do_not_specialize=["R"])
    def _density_kernel(xy_ptr, xz_ptr, yz_ptr, w_ptr, b_ptr, w_out_ptr, out_ptr, b_out, density_bias, R,
                        WIDTH: tl.constexpr, HIDDEN: tl.constexpr, BLOCK: tl.constexpr, EMULATE_BF16: tl.constexpr):
        scene = tl.program_id(1).to(tl.int64)
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # flat [ix, iy, iz] index, z fastest
        inside = idx < R * R * R
        i, j, k = idx // (R * R), idx // R % R, idx % R
        c = tl.arange(0, WIDTH)
        planes = scene * R * R * WIDTH
        # First layer: the three planes' projections at this point (bias already in xy), then SiLU.
        h = tl.load(xy_ptr + planes + (i * R + j)[:, None] * WIDTH + c[None, :], mask=inside[:, None], other=0.0)
        h += tl.load(xz_ptr + planes + (i * R + k)[:, None] * WIDTH + c[None, :], mask=inside[:, None], other=0.0)
        h += tl.load(yz_ptr + planes + (j * R + k)[:, None] * WIDTH + c[None, :], mask=inside[:, None], other=0.0)
        h = _silu(h)
        for layer in tl.static_range(HIDDEN):
            w = tl.load(w_ptr + layer * WIDTH * WIDTH + c[:, None] * WIDTH + c[None, :])  # [in, out]
            if EMULATE_BF16:  # Triton's interpreter multiplies bf16 wrongly: the same products in float32
                h = tl.dot(h.to(tl.bfloat16).to(tl.float32), w.to(tl.float32))
            else:
                h = tl.dot(h.to(tl.bfloat16), w)
            h += tl.load(b_ptr + layer * WIDTH + c)[None, :]
            h = _silu(h)
        # Density channel only. tl.sum's own combine function, through tl.reduce (what tl.sum calls): the
        # interpreter sums it with numpy, where any other combine function runs in Python element by element
        # (triton/runtime/interpreter.py, ReduceOps.apply_impl: 40 s of the tests' CPU before).
        raw = tl.reduce(h * tl.load(w_out_ptr + c)[None, :], 1, tl.standard._sum_combine) + b_out
        tl.store(out_ptr + scene * R * R * R + idx, tl.exp(raw + density_bias), mask=inside)


def density(xy: torch.Tensor, xz: torch.Tensor, yz: torch.Tensor, decoder: torch.nn.Module,
            density_bias: float) -> torch.Tensor:
    """Projected planes [B, R, R, n] float32 (xy holding the first layer's bias) -> density [B, R, R, R] float32.

    decoder: the NeRFMLP whose first Linear made the projections; the Linears between it and the last (the output,
    of which only the density row is used) are the hidden layers the kernel runs.
    """
    b, r, _, width = xy.shape
    if r > MAX_RESOLUTION:
        raise ValueError(f"resolution {r} > {MAX_RESOLUTION}: the kernel's int32 grid indices would overflow")
    linears = [m for m in decoder.layers if isinstance(m, torch.nn.Linear)]
    hidden, last = linears[1:-1], linears[-1]
    # nn.Linear keeps W as [out, in]; the kernel's products read [in, out] rows.
    weights = torch.stack([m.weight.T for m in hidden]).to(xy.device, torch.bfloat16).contiguous()
    biases = torch.stack([m.bias for m in hidden]).to(xy.device, torch.float32).contiguous()
    out = torch.empty(b, r, r, r, dtype=torch.float32, device=xy.device)
    block = BLOCK * 8 if interpreting() else BLOCK  # the interpreter's cost is per program, not per point
    grid = (triton.cdiv(r**3, block), b)
    _density_kernel[grid](
        xy.contiguous(), xz.contiguous(), yz.contiguous(), weights, biases,
        last.weight[0].to(xy.device, torch.float32).contiguous(), out, float(last.bias[0]), float(density_bias),
        r, WIDTH=width, HIDDEN=len(hidden), BLOCK=block, EMULATE_BF16=interpreting(),
    )
    return out
