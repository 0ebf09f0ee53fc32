"""The Triton kernels of lora_triton.py (read its docstring for the formulas); imported on first use only.

Every kernel draws keep[i, j] = tl.rand(seed, i * n_cols + j) < p_keep, so forward, backward and `keep_mask`
see one mask for one seed. Pointers are to contiguous row-major tensors: x (n_rows, n_cols), A (rank, n_cols),
hidden and grad_hidden (n_rows, rank). BM x BK tiles of x, BR >= rank (a power of two >= 16, for tl.dot).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _keep(rows, cols, n_cols, seed, p_keep):
    """The (BM, BK) keep-mask tile of rows x cols (bool)."""
    return tl.rand(seed, rows[:, None] * n_cols + cols[None, :]) < p_keep


@triton.jit
def _dropped_x(x_ptr, rows, cols, n_rows, n_cols, seed, p_keep):
    """The (BM, BK) tile of x with its dropout mask applied (not rescaled); zero outside x."""
    x = tl.load(x_ptr + rows[:, None] * n_cols + cols[None, :],
                mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    return x * _keep(rows, cols, n_cols, seed, p_keep).to(x.dtype)


@triton.jit
def mask_kernel(out_ptr, n_rows, n_cols, seed, p_keep, BM: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(out_ptr + rows[:, None] * n_cols + cols[None, :],
             _keep(rows, cols, n_cols, seed, p_keep).to(tl.uint8), mask=inside)


@triton.jit
def down_kernel(x_ptr, a_ptr, h_ptr, n_rows, n_cols, rank, seed, p_keep, rescale,
                BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    ranks = tl.arange(0, BR)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for start in range(0, n_cols, BK):
        cols = start + tl.arange(0, BK)
        x = _dropped_x(x_ptr, rows, cols, n_rows, n_cols, seed, p_keep)
        a_t = tl.load(a_ptr + ranks[None, :] * n_cols + cols[:, None],  # A^T tile (BK, BR)
                      mask=(ranks[None, :] < rank) & (cols[:, None] < n_cols), other=0.0)
        acc += tl.dot(x, a_t)
    tl.store(h_ptr + rows[:, None] * rank + ranks[None, :], (acc * rescale).to(h_ptr.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (ranks[None, :] < rank))


@triton.jit
def grad_x_kernel(g_ptr, a_ptr, gx_ptr, n_rows, n_cols, rank, seed, p_keep, rescale,
                  BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    ranks = tl.arange(0, BR)
    g = tl.load(g_ptr + rows[:, None] * rank + ranks[None, :],
                mask=(rows[:, None] < n_rows) & (ranks[None, :] < rank), other=0.0)
    a = tl.load(a_ptr + ranks[:, None] * n_cols + cols[None, :],
                mask=(ranks[:, None] < rank) & (cols[None, :] < n_cols), other=0.0)
    grad = tl.dot(g, a) * rescale * _keep(rows, cols, n_cols, seed, p_keep).to(tl.float32)
    tl.store(gx_ptr + rows[:, None] * n_cols + cols[None, :], grad.to(gx_ptr.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


@triton.jit
def grad_a_kernel(g_ptr, x_ptr, ga_ptr, n_rows, n_cols, rank, seed, p_keep, rescale,
                  BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    cols = tl.program_id(0) * BK + tl.arange(0, BK)
    ranks = tl.arange(0, BR)
    acc = tl.zeros((BR, BK), dtype=tl.float32)
    for start in range(0, n_rows, BM):
        rows = start + tl.arange(0, BM)
        g_t = tl.load(g_ptr + rows[None, :] * rank + ranks[:, None],  # grad_hidden^T tile (BR, BM)
                      mask=(rows[None, :] < n_rows) & (ranks[:, None] < rank), other=0.0)
        acc += tl.dot(g_t, _dropped_x(x_ptr, rows, cols, n_rows, n_cols, seed, p_keep))
    tl.store(ga_ptr + ranks[:, None] * n_cols + cols[None, :], (acc * rescale).to(ga_ptr.dtype.element_ty),
             mask=(ranks[:, None] < rank) & (cols[None, :] < n_cols))


KERNELS = {"mask": mask_kernel, "down": down_kernel, "grad_x": grad_x_kernel, "grad_a": grad_a_kernel}
