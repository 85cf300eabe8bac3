"""What runs differently on a CPU: the density grid's decoder in cache-sized chunks, malloc's thresholds, and bf16
detection.

The grid (TripoSR.density_grid) evaluates the decoder at R^3 points per scene: 16.7M at R = 256. A GPU wants big
chunks; a CPU does not. A chunk of 2^21 points makes every [points, 64] activation 512 MiB, so each of the decoder's
layers allocated fresh pages from the kernel and freed them again (glibc serves blocks that big with mmap/munmap):
about 44 s of system time and 20 million page faults per grid, more than the arithmetic. Here a chunk is a few
thousand points, every layer writes into one of two buffers allocated once (addmm into the other buffer, SiLU in
place), so the activations stay in the cores' caches and nothing is allocated per chunk.

The forward pass had the same trouble on a smaller scale: its temporaries are 3-100 MiB, and glibc gave most of them
fresh pages (1.7 million page faults, 3 s of system time per pass). On a CPU, model.py now keeps every temporary
below 24 MiB (GEGLU in blocks of rows, the ViT's attention a few heads at a time, one picture at a time), and
keep_freed_memory makes glibc serve such blocks from its heap and keep freed memory for the next one: no page faults
after the first pass, and the scene codes bit for bit those of the unblocked pass.

bf16 on a CPU pays only where the hardware multiplies bf16: AMX (amx_bf16) or AVX512-BF16 (avx512_bf16). Elsewhere
PyTorch emulates it with float32 arithmetic and conversions, several times slower than float32 itself (measured on
a Xeon whose hypervisor hides both: a 3072x1024x1024 product 5.4x slower, a 64-wide decoder layer 10x), so
precision.py runs float32 there instead.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import platform
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

# Points per chunk and worker thread, whose two [points, 64] float32 buffers are then 2 MiB each. Measured at R = 128
# (2.1M points) on a 2-core Xeon: on one thread every size from 4096 to 32768 points took 1.7-2.1 s (the spread is
# the noise of a shared machine); with the GPU's 2^21 points and a new tensor per layer the grid took 5.2-10 s on two
# threads, with 2.5 million page faults.
CHUNK_POINTS = 8192


log = logging.getLogger("grok3d.triposr")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (glibc's malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # the most glibc accepts (half its 64 MiB arena heap)
TRIM_THRESHOLD = 2**30


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Make glibc's malloc serve blocks below 32 MiB from its heap and keep up to 1 GiB of freed heap for reuse;
    -> whether it applied (glibc only). Process-wide, once; TripoSR calls it when it runs on a CPU.

    By default glibc maps a block afresh from the kernel (and unmaps it when freed) from a threshold that it learns
    from the blocks freed so far, which never passes the size of the largest block freed (12 MiB in the backbone, so
    every [3072, 1024] activation was mapped anew), and it returns freed memory at the top of its heap beyond twice
    that. Freed memory now stays resident: the process keeps its peak (which it reaches again with every batch)
    instead of giving it back between batches."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    applied = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not applied:
        log.warning("glibc refused the malloc thresholds: the CPU forward pass will page-fault more")
    return applied


@functools.lru_cache(maxsize=1)
def bf16_support() -> str | None:
    """The CPU feature that multiplies bf16 natively, 'amx_bf16' or 'avx512_bf16', or None.

    Detected, not assumed: PyTorch's own probes first (cpuinfo's CPUID reading; for AMX also whether the OS lets
    the process use the tile registers), then the flags the Linux kernel lists in /proc/cpuinfo. A hypervisor may
    hide both features from a guest on a CPU that has them: then this is None and bf16 runs as float32."""
    probes = (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported"))
    for feature, probe in probes:
        check = getattr(torch.cpu, probe, None)  # private helpers of torch.cpu (2.x); absent ones are skipped
        if check is not None and check():
            return feature
    flags = _cpuinfo_flags()
    return next((feature for feature, _ in probes if feature in flags), None)


def _cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


@torch.no_grad()
def density(xy: torch.Tensor, xz: torch.Tensor, yz: torch.Tensor, layers: nn.Sequential, density_bias: float,
            compute: torch.dtype, chunk_points: int = CHUNK_POINTS) -> torch.Tensor:
    """The decoder after its first layer, on the grid: -> density [B, R, R, R] float32, indexed [ix, iy, iz].

    xy [B, R, R, n] (first layer's bias included), xz [B, R, R, n], yz [B, R, R, n]: the first layer's products with
    the planes sampled at the grid (TripoSR.density_grid); the point (i, j, k) gets xy[i, j] + xz[i, k] + yz[j, k],
    summed in that order, as the GPU path sums them. layers: the decoder's remaining modules, SiLU and Linear only;
    only the last layer's first output (density) is computed. compute: float32, or bfloat16 (products in bf16 with
    float32 sums, each layer's output rounded to bf16, as CPU autocast runs them). chunk_points: points decoded at
    once (whole rows of R points; at least one row).

    Each of torch's threads takes every T-th chunk with its own buffers and single-threaded operations: a chunk's
    layers are too small to split across cores without a barrier per layer, and barriers are what a busy machine
    punishes (measured at R = 128 with other work on the 2 cores: 90 s instead of 1.6 s with 2 OpenMP threads
    spinning at ~50,000 barriers, while independent threads lose only their share of the cores)."""
    b, r, _, n = xy.shape
    xy, xz, yz = (t.float().contiguous() for t in (xy, xz, yz))
    plan = _plan(layers, compute)
    rows = max(1, chunk_points // r)  # (i, j) rows of R points per chunk
    si, sj = (rows // r, r) if rows >= r else (1, rows)  # whole x-slices when they fit, else part of one
    chunks = [(s, i, j) for s in range(b) for i in range(0, r, si) for j in range(0, r, sj)]
    out = torch.empty(b, r, r, r)

    def work(share: list[tuple[int, int, int]]) -> None:
        size = si * sj * r
        pre = torch.empty(size, n)  # float32 sums of the three planes' parts
        # float32: the sums are the first activations; bf16: they are rounded once into a bf16 buffer
        a = pre if compute == torch.float32 else torch.empty(size, n, dtype=compute)
        other, raw = torch.empty(size, n, dtype=compute), torch.empty(size)
        for s, i, j in share:
            di, dj = min(si, r - i), min(sj, r - j)
            m = di * dj * r
            p = pre[:m].view(di, dj, r, n)
            torch.add(xy[s, i : i + di, j : j + dj, None], xz[s, i : i + di, None], out=p)
            p += yz[s, None, j : j + dj]
            if a is not pre:
                a[:m].copy_(pre[:m])
            x = _mlp(plan, a[:m], other[:m], raw[:m])
            torch.exp(x.add_(density_bias), out=out[s, i : i + di, j : j + dj].view(-1))

    threads = torch.get_num_threads()
    if threads == 1 or len(chunks) == 1:
        work(chunks)
        return out
    with _one_grid_at_a_time, _single_threaded_ops(threads), ThreadPoolExecutor(threads) as pool:
        for done in [pool.submit(work, chunks[t::threads]) for t in range(threads)]:
            done.result()
    return out


_one_grid_at_a_time = threading.Lock()  # two grids would fight over the cores and over the thread setting


@contextmanager
def _single_threaded_ops(threads: int) -> Iterator[None]:
    """torch.set_num_threads(1) while the workers run (new threads take it up when they start), then `threads`
    again. The setting is process-wide: other torch work in the process meanwhile runs on one thread too."""
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _plan(layers: nn.Sequential, compute: torch.dtype) -> list[tuple[str, torch.Tensor | None, torch.Tensor | None]]:
    """The modules as ("silu", None, None) / ("linear", W^T, bias) in `compute`; the last Linear as ("density",
    its first row, its first bias), since the grid needs only the density output."""
    mods = list(layers)
    linears = [k for k, mod in enumerate(mods) if isinstance(mod, nn.Linear)]
    plan: list[tuple[str, torch.Tensor | None, torch.Tensor | None]] = []
    for k, mod in enumerate(mods):
        if isinstance(mod, nn.SiLU):
            plan.append(("silu", None, None))
        elif isinstance(mod, nn.Linear) and k == linears[-1]:
            if k != len(mods) - 1:
                raise ValueError("the decoder must end with its output Linear")
            plan.append(("density", mod.weight[0].to(compute), mod.bias[0].float()))
        elif isinstance(mod, nn.Linear):
            plan.append(("linear", mod.weight.t().to(compute), mod.bias.to(compute)))
        else:
            raise ValueError(f"the CPU grid runs SiLU and Linear layers only, not {type(mod).__name__}")
    return plan


def _mlp(plan: list, x: torch.Tensor, other: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """The first activations x [m, n] through the plan, alternating between x and other (both overwritten) ->
    raw density [m] float32 (before the density bias), written into `raw`."""
    for kind, weight, bias in plan:
        if kind == "silu":
            torch.nn.functional.silu(x, inplace=True)
        elif kind == "linear":
            torch.addmm(bias, x, weight, out=other)
            x, other = other, x
        elif x.dtype == torch.float32:
            torch.mv(x, weight, out=raw)
            raw += bias
        else:  # bf16 products accumulated in float32 by the library, the answer rounded to bf16 as autocast does
            raw.copy_(torch.mv(x, weight))
            raw += bias
    return raw
