"""Reference → target attention capture for SCAL and MDL.

The losses need two things from the reference → target block of attention, eq. 8:

$$
A[u, v] = \\frac{1}{L H} \\sum_{l=1}^{L} \\sum_{h=1}^{H}
\\operatorname{softmax}_{t \\in \\text{target}}\\left(\\frac{q^{(l,h)}_u \\cdot k^{(l,h)}_t}{\\sqrt d}\\right)_v
$$

(the softmax runs over the ``N_tgt`` target keys only, not over text or reference keys):

- SCAL (eq. 10) needs $\\log A[G(u), v]$ at the P annotated pairs;
- MDL (eq. 11-12) needs, per reference, the mean attention row over its annotated points (or
  over all its tokens).

`RefTargetCapture` computes exactly these, block by block, without ever holding an
``N_ref × N_tgt`` map: the mean of probabilities over blocks and heads is a ``logsumexp`` of
log-probabilities minus $\\log(L H)$, and the rows are accumulated as ``(B, K, N_tgt)``.
`dense_ref_target_attention` is the slow, obviously-correct twin that materialises A.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import FunctionCtx

from ..correspondence import Correspondences
from ..utils.checks import (
    check_floating,
    check_int,
    check_option,
    check_shape,
    compute_dtype,
)
from ..utils.finite import check_finite
from ._chunked import Plan, TargetSoftmaxStats
from ._fused import FusedPairStats

__all__ = ["AGGREGATES", "BACKENDS", "CaptureResult", "RefTargetCapture", "dense_ref_target_attention"]

AGGREGATES = ("points", "all")
"""Row aggregations of `RefTargetCapture`: over annotated points, or over all tokens."""

_FUSED_AUTO_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

BACKENDS = ("torch", "fused", "auto")
"""Kernels of `RefTargetCapture`: the chunked torch path (the reference), fused attention
kernels (SCAL only), or ``"auto"`` (fused for half, bf16 and float32 CUDA tensors when
``aggregate`` is None, else torch)."""


@dataclass(frozen=True, eq=False)
class CaptureResult:
    """What SCAL and MDL need from the captured attention, as returned by
    `RefTargetCapture.result` (see its example); pass it as ``x`` to the losses.

    Args:
        pair_log_probs: ``(B, K, P)`` float, $\\log A[G(u), v]$ of every pair; 0 where
            ``corr.point_mask`` is False.
        ref_rows: ``(B, K, N_tgt)`` float, the mean attention row of each reference (over its
            annotated points or over all its tokens, see ``aggregate``); zeros for references
            that have none. None when captured with ``aggregate=None``.
        aggregate: ``"points"``, ``"all"`` or None.
        corr: the correspondences the capture was built for.
        num_blocks: L, the number of blocks averaged.
        num_heads: H, the number of heads averaged.

    Example:
        >>> corr = Correspondences.from_dicts([[{0: 1}]], ref_tokens=[2], tgt_tokens=3)
        >>> capture = RefTargetCapture(corr, aggregate="all")
        >>> with torch.no_grad():  # evaluation: no gradients needed
        ...     capture.add(torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 3, 4))  # uniform attention
        >>> out = capture.result()
        >>> out.pair_log_probs.exp(), out.ref_rows, (out.num_blocks, out.num_heads)
        (tensor([[[0.3333]]]), tensor([[[0.3333, 0.3333, 0.3333]]]), (1, 2))
    """

    pair_log_probs: torch.Tensor
    ref_rows: torch.Tensor | None
    aggregate: str | None
    corr: Correspondences
    num_blocks: int
    num_heads: int


def _in_backward_pass() -> bool:
    """True while autograd's engine runs a backward pass on this thread.

    A capture's ``add`` called then is a non-reentrant checkpoint's recomputation of a block that
    was already fed in the forward (checkpoint recomputes inside the backward, when the first
    saved tensor of the region is unpacked). torch's own trackers use the same signal
    (``torch.utils.module_tracker``).
    """
    return torch._C._current_graph_task_id() != -1


def _inside_function_forward(max_depth: int = 64) -> bool:
    """True when called (at most ``max_depth`` frames down) from the ``forward`` of a custom
    ``torch.autograd.Function``, which runs under no_grad: what reentrant checkpointing
    (``torch.utils.checkpoint(..., use_reentrant=True)``, DeepSpeed's) wraps the block in."""
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return False
        code = frame.f_code
        if code.co_name == "forward" and code.co_argcount >= 1:
            if isinstance(frame.f_locals.get(code.co_varnames[0]), FunctionCtx):
                return True
        frame = frame.f_back
    return False


_REENTRANT_MESSAGE = (
    "`add` was called inside the forward of a custom autograd Function, such as "
    "torch.utils.checkpoint(..., use_reentrant=True), which runs it under no_grad: the captured statistics "
    "would carry no graph and a loss from them would train nothing. "
    "Use non-reentrant checkpointing, `checkpoint(fn, ..., use_reentrant=False)` (what diffusers' "
    "enable_gradient_checkpointing() does), or feed the capture outside the checkpointed function."
)


def _points_weights(corr: Correspondences, dtype: torch.dtype) -> torch.Tensor:
    """``(B, K, K*P)``: reference k averages the rows of its own real points (1/P_k each)."""
    batch, refs, points = corr.point_mask.shape
    per_point = corr.point_mask.to(dtype) / corr.num_points.clamp_min(1)[..., None].to(dtype)
    eye = torch.eye(refs, dtype=dtype, device=corr.device)
    return torch.einsum("kj,bjp->bkjp", eye, per_point).reshape(batch, refs, refs * points)


def _all_weights(corr: Correspondences, dtype: torch.dtype) -> torch.Tensor:
    """``(B, K, N_ref_total)``: a present reference k averages all of its tokens (1/N_k each)."""
    blocks = [
        torch.full((1, n), 1.0 / n, dtype=dtype, device=corr.device) for n in corr.ref_tokens
    ]
    layout = torch.block_diag(*blocks)  # (K, N_ref_total)
    return corr.ref_present.to(dtype)[..., None] * layout


class _LogAddExp(torch.autograd.Function):
    """``logaddexp(total, block)`` whose backward reads its two small weights from ``ctx``, not
    through ``save_for_backward``: nothing for a non-reentrant checkpoint to free and recompute, so
    a replayed `add` (which skips the sum) saves the same tensors as the forward did."""

    @staticmethod
    def forward(ctx: Any, total: torch.Tensor, block: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = torch.logaddexp(total, block)
        ctx.weights = (torch.exp(total - out).detach(), torch.exp(block - out).detach())
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        total_weight, block_weight = ctx.weights
        return grad * total_weight, grad * block_weight


class RefTargetCapture:
    """Captures, block by block, the reference → target attention statistics of eq. 8.

    Feed it once per chosen transformer block with `add`, then call `result`. It
    never materialises an ``N_ref × N_tgt`` map: each block is processed in chunks of query rows
    by a custom autograd function that keeps only per-row log-sum-exps and recomputes each chunk's
    softmax in backward. Memory held across blocks is, per block, one value per pair and the
    per-row log-sum-exps ``(B, H, R)`` (R = ``K·P`` annotated rows, or ``N_ref_total`` with
    ``aggregate="all"``), plus ``O(B·K·N_tgt)`` for the rows and references to the fed queries
    and keys (which the model keeps for its own backward anyway).

    Loss math runs in float32 (float64 for float64 inputs) whatever the model dtype; gradients
    flow to the queries and keys in their own dtype.

    Life cycle: one capture per forward pass. Create it (or `reset` it), feed every chosen block,
    take `result`, build the loss and backpropagate; then `reset` before the next forward (for
    gradient accumulation: per micro-batch). Feeding a capture again after its `result` was taken
    raises `ValueError` instead of mixing two steps.

    Activation checkpointing: `add` may be called inside a function checkpointed with
    ``torch.utils.checkpoint(fn, ..., use_reentrant=False)`` (diffusers'
    ``enable_gradient_checkpointing()``). Only the fed query and key are saved through autograd
    (so the checkpoint frees and recomputes them), the recomputation in backward replays `add`
    without recording a second block, and values and gradients equal the unchecked run. Inside a
    reentrant checkpoint (``use_reentrant=True``, which runs its function under no_grad) `add`
    (or in any custom autograd Function's forward) raises `RuntimeError`, since a loss from it
    would train nothing.

    Non-finite values: while `mosaic_kit.finite_checks` is on, `add` raises `ValueError` for
    NaN or inf in the query or key, and `result` for non-finite statistics (one device sync each;
    off by default).

    Args:
        corr: the correspondences of the batch (moved to the queries' device on first use).
        aggregate: rows for MDL: ``"points"`` (mean over each reference's annotated points, paper),
            ``"all"`` (mean over all of each present reference's tokens, released) or None (no
            rows, SCAL only).
        scale: logit scale; default ``1/sqrt(D)``.
        max_chunk_elements: the most logits (``B·H·rows·N_tgt``) computed at once, which bounds
            the transient memory of a block. Default: 1/16 of one block's logits, clamped to
            ``[2**16, 2**24]`` (a chunk's buffers stay a small fraction of one dense map).
        backend: ``"torch"`` (default; chunked, plain torch, runs everywhere), ``"fused"``
            (pairs through fused attention kernels: xformers' memory-efficient attention when
            installed on CUDA, else torch's efficient-attention kernel on CUDA or its
            flash-attention kernel on CPU; only with ``aggregate=None``, since rows need every
            probability) or ``"auto"`` (``"fused"`` for half, bf16 or float32 CUDA tensors with
            ``aggregate=None``, else ``"torch"``). The torch path is the reference the fused one is tested against.

    Example:
        >>> corr = Correspondences.from_dicts([[{0: 1, 2: 3}, {1: 0}]], ref_tokens=[3, 2], tgt_tokens=4)
        >>> capture = RefTargetCapture(corr, aggregate="points")
        >>> for _ in range(2):  # two blocks
        ...     query = torch.randn(1, 4, 5, 8, requires_grad=True)  # (B, H, N_ref_total, D)
        ...     key = torch.randn(1, 4, 4, 8, requires_grad=True)    # (B, H, N_tgt, D)
        ...     capture.add(query, key)
        >>> out = capture.result()
        >>> out.pair_log_probs.shape, out.ref_rows.shape
        (torch.Size([1, 2, 2]), torch.Size([1, 2, 4]))
        >>> bool(torch.all(out.pair_log_probs <= 0)), torch.allclose(out.ref_rows.sum(-1), torch.ones(1, 2))
        (True, True)
    """

    def __init__(
        self,
        corr: Correspondences,
        aggregate: str | None = "points",
        scale: float | None = None,
        max_chunk_elements: int | None = None,
        backend: str = "torch",
    ) -> None:
        if not isinstance(corr, Correspondences):
            raise ValueError(f"Expected `corr` to be a Correspondences, but got {type(corr).__name__}.")
        check_option("aggregate", aggregate, AGGREGATES + (None,))
        check_option("backend", backend, BACKENDS)
        if backend == "fused" and aggregate is not None:
            raise ValueError(
                f"Expected `aggregate=None` with backend 'fused' (fused kernels give pair statistics only), "
                f"but got aggregate={aggregate!r}; use backend 'torch' or 'auto'."
            )
        self.backend = backend
        valid_scale = isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0
        if scale is not None and not valid_scale:
            raise ValueError(f"Expected `scale` to be a positive finite number or None, but got {scale!r}.")
        self.corr = corr
        self.aggregate = aggregate
        self.scale = scale
        self.max_chunk_elements = (
            None if max_chunk_elements is None else check_int("max_chunk_elements", max_chunk_elements, minimum=1)
        )
        self._prepared: dict[str, torch.Tensor] | None = None
        self._plans: dict[int, Plan] = {}
        self.reset()

    # -- state --------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forgets every fed block and the taken result (call between training steps, or between
        micro-batches, when reusing the object)."""
        self._num_heads: int | None = None
        self._head_dim: int | None = None
        self._result_taken = False
        self._warned_no_grad = False
        self._zero_sums()

    def _zero_sums(self) -> None:
        """The running sums over blocks: pairs as a log-sum-exp (of each block's head mean), rows
        as a sum, and the block count as a CPU tensor. Tensors, not lists or ints, so that a
        compiled block reads no Python value that changes from block to block (dynamo would
        guard on it and compile again for every block)."""
        self._blocks = torch.zeros((), dtype=torch.long)
        # the same count as a Python int for eager feeding, so that `num_blocks` reads no tensor
        # value (a value read is impossible under fake tensors, e.g. benchmarks/bench_memory.py);
        # a compiled `add` only counts in the tensor, and `num_blocks` then reads it
        self._eager_blocks, self._compiled_add = 0, False
        self._pair_sum: torch.Tensor | None = None
        self._rows_sum: torch.Tensor | None = None
        if self._prepared is not None:
            device, dtype = self._prepared_for
            # requiring grad (when grad is on) as the sums do after the first block: a compiled block
            # then sees the same kind of tensor for every block (dynamo guards on requires_grad)
            grad = torch.is_grad_enabled()
            self._pair_sum = torch.full(self._prepared["pair_flat"].shape, -math.inf, dtype=dtype, device=device)
            self._pair_sum.requires_grad_(grad)
            if self.aggregate is not None:
                corr = self.corr
                self._rows_sum = torch.zeros(corr.batch_size, corr.num_refs, corr.tgt_tokens, dtype=dtype, device=device)
                self._rows_sum.requires_grad_(grad)

    @property
    def num_blocks(self) -> int:
        """How many blocks have been fed since construction or `reset`."""
        return int(self._blocks) if self._compiled_add else self._eager_blocks

    def _prepare(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Index and weight tensors on the blocks' device, built once.

        The pairs are listed flat (valid ones only), sorted by the position of their query row in
        the row list that the kernel walks: the pairs' own rows for ``"points"`` and None, all
        reference rows for ``"all"``.
        """
        if self._prepared is not None and (device, dtype) != self._prepared_for:
            if torch.compiler.is_compiling():
                raise RuntimeError(
                    f"RefTargetCapture was prepared for {self._prepared_for[0]} with loss math in "
                    f"{self._prepared_for[1]}, but a compiled region feeds {device} needing {dtype}: call "
                    "`capture.prepare(...)` for the device and dtype of the fed blocks."
                )
            if self.num_blocks == 0:  # prepared ahead for another device (e.g. CPU offloading): nothing fed yet
                self._prepared, self._plans = None, {}
        if self._prepared is not None:
            if (device, dtype) != self._prepared_for:
                raise ValueError(
                    f"Expected every block on {self._prepared_for[0]} with loss math in {self._prepared_for[1]}, "
                    f"but got {device} needing {dtype}."
                )
            return self._prepared
        corr = self.corr.to("cpu")
        batch, refs, points = corr.point_mask.shape
        flat = corr.point_mask.flatten().nonzero().flatten()  # valid pairs, index into B·K·P
        pair_batch = flat // (refs * points)
        if self.aggregate == "all":
            pair_pos = corr.global_rows.flatten()[flat]
        else:
            pair_pos = flat % (refs * points)
        order = torch.sort(pair_pos, stable=True).indices
        prepared = {
            "pair_flat": flat[order].to(device),
            "pair_batch": pair_batch[order].to(device),
            "pair_pos": pair_pos[order].to(device),
            "pair_target": corr.tgt_index.flatten()[flat][order].to(device),
        }
        if self.aggregate == "all":
            prepared["weights"] = _all_weights(corr, dtype).to(device)
        else:
            rows = torch.where(corr.point_mask, corr.global_rows, 0).flatten(1)
            prepared["rows"] = rows.to(device)
            if self.aggregate == "points":
                prepared["weights"] = _points_weights(corr, dtype).to(device)
        self._prepared, self._prepared_for = prepared, (device, dtype)
        self._zero_sums()
        return prepared

    def prepare(self, device: torch.device | str, dtype: torch.dtype = torch.float32, heads: int | None = None) -> None:
        """Builds, ahead of the first `add`, the index tensors (and with ``heads`` the chunk plan)
        that `add` otherwise builds on its first call.

        Optional in eager mode. Required before an `add` that runs inside a compiled region
        (``torch.compile``, e.g. diffusers' ``compile_repeated_blocks``): building them needs
        data-dependent host work that dynamo cannot trace. `CaptureProcessors.set_capture` calls
        it for the model's device, dtype and head count.

        Args:
            device: the device of the queries and keys that will be fed.
            dtype: their dtype (the loss math then runs in float64 for float64, else float32).
            heads: H, the head count of the fed blocks; None leaves the plan to the first `add`.

        Raises:
            ValueError: ``heads`` is not a positive int, or the capture was prepared (or fed) for
                another device or compute dtype.

        Example:
            >>> corr = Correspondences.from_dicts([[{0: 1}]], ref_tokens=[2], tgt_tokens=3)
            >>> capture = RefTargetCapture(corr)
            >>> capture.prepare("cpu", torch.bfloat16, heads=2)  # loss math in float32
            >>> capture.add(torch.randn(1, 2, 2, 4), torch.randn(1, 2, 3, 4))
            >>> capture.num_blocks
            1
        """
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"Expected `dtype` to be a floating torch.dtype, but got {dtype!r}.")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # as the tensors' own device reads
            device = torch.device("cuda", torch.cuda.current_device())
        prepared = self._prepare(device, compute_dtype(dtype))
        if heads is not None:
            self._plan(prepared, check_int("heads", heads, minimum=1))

    def _plan(self, prepared: dict[str, torch.Tensor], heads: int) -> Plan:
        """The chunking of one block (cached: it depends only on the head count)."""
        rows = prepared.get("rows")
        num_rows = self.corr.total_ref_tokens if rows is None else rows.shape[1]
        per_row = self.corr.batch_size * heads * self.corr.tgt_tokens
        budget = self.max_chunk_elements or min(2**24, max(2**16, per_row * num_rows // 16))
        chunk_rows = max(1, budget // per_row)
        if chunk_rows not in self._plans:
            self._plans[chunk_rows] = Plan(
                rows=rows,
                weights=prepared.get("weights"),
                pair_batch=prepared["pair_batch"],
                pair_pos=prepared["pair_pos"],
                pair_target=prepared["pair_target"],
                chunk_rows=chunk_rows,
            )
        return self._plans[chunk_rows]

    # -- feeding ------------------------------------------------------------------------------------
    def add(self, query: torch.Tensor, key: torch.Tensor) -> None:
        """Feeds one block.

        Safe inside a non-reentrant checkpointed function: called again by the checkpoint's
        recomputation during backward, it replays the block without counting it twice.

        Args:
            query: ``(B, H, N_ref_total, D)`` post-RoPE queries of all reference tokens (the K
                references concatenated in slot order).
            key: ``(B, H, N_tgt, D)`` post-RoPE keys of the target tokens.

        Raises:
            ValueError: bad shapes or dtypes; a capture whose `result` was taken and that was not
                `reset`; NaN or inf in ``query`` or ``key`` while `mosaic_kit.finite_checks` is on.
            RuntimeError: inside ``torch.utils.checkpoint(..., use_reentrant=True)`` (or any
                custom autograd Function's forward, which runs under no_grad).

        Warns:
            UserWarning: grad mode is on but neither ``query`` nor ``key`` requires grad (a
                loss from this capture would train nothing).

        Example:
            >>> # inside a checkpointed block, as with diffusers' gradient checkpointing
            >>> from torch.utils.checkpoint import checkpoint
            >>> corr = Correspondences.from_dicts([[{0: 1}]], ref_tokens=[2], tgt_tokens=3)
            >>> capture = RefTargetCapture(corr, aggregate="all")
            >>> weight = torch.randn(8, 8, requires_grad=True)
            >>> def block(x):  # a toy block: q, k projections; the capture is fed inside
            ...     qk = (x @ weight).view(1, 5, 2, 4).transpose(1, 2)  # (B, H, tokens, D)
            ...     capture.add(qk[:, :, :2], qk[:, :, 2:])  # reference queries, target keys
            ...     return x @ weight
            >>> out = checkpoint(block, torch.randn(1, 5, 8), use_reentrant=False)
            >>> loss = capture.result().pair_log_probs.sum() + out.sum()
            >>> loss.backward()  # recomputes the block, which calls `add` again
            >>> capture.num_blocks, weight.grad.shape
            (1, torch.Size([8, 8]))
        """
        corr = self.corr
        check_shape("query", query, [corr.batch_size, None, corr.total_ref_tokens, None], "(B, H, N_ref_total, D)")
        heads, dim = query.shape[1], query.shape[3]
        check_shape("key", key, [corr.batch_size, heads, corr.tgt_tokens, dim], "(B, H, N_tgt, D)")
        check_floating("query", query)
        check_floating("key", key)
        if query.device != key.device:
            raise ValueError(f"Expected `query` and `key` on one device, but got {query.device} and {key.device}.")
        if query.dtype != key.dtype:
            raise ValueError(f"Expected `key` with the dtype of `query` ({query.dtype}), but got {key.dtype}.")
        compiling = torch.compiler.is_compiling()
        # (checked by `result` too: a compiled block does not read what earlier blocks recorded,
        # which would make dynamo guard on it and recompile for the next block)
        if not compiling and self._num_heads is not None and (heads, dim) != (self._num_heads, self._head_dim):
            raise ValueError(
                f"Expected every block with (H, D) = ({self._num_heads}, {self._head_dim}), but got ({heads}, {dim})."
            )
        # a checkpoint recomputing a block fed in the forward (never while dynamo traces: a compiled
        # region is recomputed by its own backward graph, or by an eager replay with dynamo off)
        replay = False if compiling else _in_backward_pass()
        if not replay:
            self._check_feeding(query, key, compiling)
        dtype = compute_dtype(query.dtype)
        if compiling and self._prepared is None:
            raise RuntimeError(
                "RefTargetCapture.add inside a compiled region needs `capture.prepare(device, dtype, heads)` first (its "
                "index tensors are data-dependent); `CaptureProcessors.set_capture` calls it for the model."
            )
        prepared = self._prepare(query.device, dtype)
        scale = self.scale if self.scale is not None else dim**-0.5
        self._num_heads, self._head_dim = heads, dim

        fused = self.backend == "fused" or (
            self.backend == "auto" and self.aggregate is None and query.is_cuda and query.dtype in _FUSED_AUTO_DTYPES
        )
        # A replay runs the same ops that save tensors for backward (the checkpoint matches them
        # by order) but computes and records nothing.
        if fused:
            rows_index = prepared["rows"]
            query_rows = query.gather(2, rows_index[:, None, :, None].expand(-1, heads, -1, dim))
            pair = FusedPairStats.apply(
                query_rows, key, prepared["pair_batch"], prepared["pair_pos"], prepared["pair_target"], scale, replay
            )
            rows = None
        else:
            pair, rows = TargetSoftmaxStats.apply(query, key, self._plan(prepared, heads), scale, replay)
        if replay:
            return
        # the head mean of each block's probabilities, summed over blocks as a log-sum-exp
        self._pair_sum = _LogAddExp.apply(self._pair_sum, pair - math.log(heads))
        if self.aggregate is not None:
            self._rows_sum = self._rows_sum + rows
        self._blocks = self._blocks + 1
        if torch.compiler.is_compiling():
            self._compiled_add = True
        else:
            self._eager_blocks += 1

    def _check_feeding(self, query: torch.Tensor, key: torch.Tensor, compiling: bool) -> None:
        """The checks of a forward-pass `add` (not of a checkpoint's replay). While dynamo traces,
        the checks that need Python frames or a device sync are left out: the non-finite checks
        of `result` (outside the compiled region) still see a NaN or inf fed here."""
        if self._result_taken:
            raise ValueError(
                f"Expected a fresh capture, but got one whose `result()` was already taken after {self.num_blocks} "
                "block(s): call `reset()` before feeding the next forward pass (or micro-batch), so that two steps "
                "never mix."
            )
        if compiling:
            return
        if not torch.is_grad_enabled():
            if _inside_function_forward():
                raise RuntimeError(_REENTRANT_MESSAGE)
        elif not (query.requires_grad or key.requires_grad) and not self._warned_no_grad:
            self._warned_no_grad = True
            warnings.warn(
                "RefTargetCapture.add: grad mode is on but neither `query` nor `key` requires grad, so a loss "
                "from this capture would train nothing (were they detached, or computed under no_grad?).",
                UserWarning,
                stacklevel=3,
            )
        check_finite("query", query)
        check_finite("key", key)

    def result(self) -> CaptureResult:
        """The statistics averaged over the fed blocks and heads (see `CaptureResult`).

        After this, `add` raises until `reset` (a capture serves one forward pass). While
        `mosaic_kit.finite_checks` is on, raises `ValueError` for non-finite statistics.
        """
        blocks = self.num_blocks
        if blocks == 0:
            raise ValueError("Expected at least one block fed with `add(query, key)` before `result()`, but got none.")
        self._result_taken = True
        prepared = self._prepared
        assert prepared is not None and self._num_heads is not None and self._pair_sum is not None
        log_mean = self._pair_sum - math.log(blocks)
        corr = self.corr
        pair_log_probs = log_mean.new_zeros(corr.point_mask.numel()).scatter(0, prepared["pair_flat"], log_mean)
        pair_log_probs = pair_log_probs.view(corr.point_mask.shape)
        rows = None if self._rows_sum is None else self._rows_sum / blocks
        check_finite("pair_log_probs", pair_log_probs)
        if rows is not None:
            check_finite("ref_rows", rows)
        return CaptureResult(
            pair_log_probs=pair_log_probs,
            ref_rows=rows,
            aggregate=self.aggregate,
            corr=self.corr,
            num_blocks=blocks,
            num_heads=self._num_heads,
        )


def dense_ref_target_attention(
    queries: list[torch.Tensor] | tuple[torch.Tensor, ...],
    keys: list[torch.Tensor] | tuple[torch.Tensor, ...],
    scale: float | None = None,
) -> torch.Tensor:
    """The dense reference → target attention map A of eq. 8 (slow twin of the capture).

    Materialises ``(B, H, N_ref_total, N_tgt)`` probabilities per block: use it for tests and small
    inputs only.

    Args:
        queries: per block, ``(B, H, N_ref_total, D)`` reference queries.
        keys: per block, ``(B, H, N_tgt, D)`` target keys.
        scale: logit scale; default ``1/sqrt(D)``.

    Returns:
        ``(B, N_ref_total, N_tgt)``: the softmax over target keys, averaged over blocks and heads,
        in float32 (float64 for float64 inputs).

    Example:
        >>> q, k = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8)
        >>> A = dense_ref_target_attention([q], [k])
        >>> A.shape, torch.allclose(A.sum(-1), torch.ones(2, 5))
        (torch.Size([2, 5, 7]), True)
    """
    if len(queries) != len(keys) or not queries:
        raise ValueError(
            f"Expected `queries` and `keys` with one entry per block (>= 1), but got {len(queries)} and {len(keys)}."
        )
    total = None
    for query, key in zip(queries, keys):
        check_shape("query", query, [None, None, None, None], "(B, H, N_ref_total, D)")
        check_shape("key", key, [query.shape[0], query.shape[1], None, query.shape[3]], "(B, H, N_tgt, D)")
        check_floating("query", query)
        check_floating("key", key)
        dtype = compute_dtype(query.dtype)
        block_scale = scale if scale is not None else query.shape[-1] ** -0.5
        with torch.autocast(query.device.type, enabled=False):
            logits = torch.matmul(query.to(dtype), key.to(dtype).transpose(-1, -2)) * block_scale
            probs = logits.softmax(dim=-1).mean(dim=1)
        total = probs if total is None else total + probs
    return total / len(queries)
