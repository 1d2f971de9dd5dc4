"""Fake tensors at real scale: CUDA's autocast policy on the CPU, fake parameters, the tracker.

What CPU fake tensors change and how it is handled (checked facts, see the project's notes on
real-scale memory): CUDA autocast runs softmax, layer norm, exp, sums and a few more ops in
float32 where CPU autocast keeps bf16, so `GpuAutocastPolicy` (a ``TorchFunctionMode``, active for
the whole step so that a checkpoint's recomputation in backward sees it too) gives those ops
CUDA's float32 policy; MemTracker's gradient hooks go on trainable parameters only
(`tracker_class`); small index tensors are real constants (`real`)."""

from __future__ import annotations

import contextlib

# --------------------------------------------------------------------------------- GPU autocast policy
def _gpu_fp32_functions():
    import torch
    import torch.nn.functional as F

    # CUDA autocast's float32 list (the ops that matter in these models and losses): CPU autocast
    # keeps them in bf16. "dtype" ops take a float32 output dtype instead of an input cast, as CUDA's
    # fp32_set_opt_dtype policy does.
    cast = {F.layer_norm, F.group_norm, torch.layer_norm, torch.group_norm, torch.exp, torch.Tensor.exp,
            torch.log, torch.Tensor.log, torch.pow, torch.Tensor.pow, torch.Tensor.__pow__, torch.rsqrt,
            torch.Tensor.rsqrt, torch.logsumexp, torch.Tensor.logsumexp, F.mse_loss, torch.norm, torch.Tensor.norm,
            torch.linalg.vector_norm}
    with_dtype = {F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax, torch.log_softmax,
                  torch.Tensor.log_softmax, torch.sum, torch.Tensor.sum, torch.cumsum, torch.Tensor.cumsum,
                  torch.prod, torch.Tensor.prod}
    return cast, with_dtype


class GpuAutocastPolicy:
    """A ``TorchFunctionMode`` giving CUDA autocast's float32 policy to the ops CPU autocast runs in
    bf16 (softmax, log-softmax, layer and group norm, exp, log, pow, rsqrt, sums, logsumexp, norms),
    while CPU autocast is on: inputs of the float32-list ops are cast to float32, and the
    ``dtype``-taking ops get ``dtype=torch.float32`` (their output is float32, as on CUDA).

    Keep it active for the whole step: a non-reentrant checkpoint recomputes blocks during the
    backward, under the forward's autocast state."""

    def __new__(cls):
        import torch
        from torch.overrides import TorchFunctionMode

        cast, with_dtype = _gpu_fp32_functions()

        class _Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if torch.is_autocast_enabled("cpu") and (func in cast or func in with_dtype):
                    def up(x):
                        return x.float() if isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16) else x

                    with torch.autocast("cpu", enabled=False):
                        if func in cast:
                            return func(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})
                        first = args[0] if args else None
                        if (isinstance(first, torch.Tensor) and first.dtype in (torch.bfloat16, torch.float16)
                                and kwargs.get("dtype") is None):
                            kwargs = dict(kwargs, dtype=torch.float32)
                        return func(*args, **kwargs)
                return func(*args, **kwargs)

        return _Mode()


def policy_checkpoint(function, *args):
    """``torch.utils.checkpoint(..., use_reentrant=False)`` whose function runs under
    `GpuAutocastPolicy`, in the forward and in the recomputation alike."""
    from torch.utils.checkpoint import checkpoint

    def run(*inner):
        with GpuAutocastPolicy():
            return function(*inner)

    return checkpoint(run, *args, use_reentrant=False)


# ------------------------------------------------------------------------------------ fake tensors
def fake_mode():
    """A ``FakeTensorMode`` without its dispatch cache. The cache is shared by the whole process,
    and on its first miss for an op signature MemTracker saw more storages alive: FLUX.1-dev with
    an NF4 base and K = 4 read +131.9 MB for MOSAIC in a fresh process and +2.1 MB when the same
    step followed another one; without the cache, +2.1 MB both ways (docs/which-gpu.md)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    mode.cache_enabled = False
    return mode


def real():
    """Suspends fake mode (small index and bookkeeping tensors are real constants)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    return unset_fake_temporarily()


def materialise(module, fake_mode=None, device: str = "cpu"):
    """Replaces every meta parameter and buffer of ``module`` by a tensor of the same shape, dtype
    and ``requires_grad`` on ``device``: a fake tensor under ``fake_mode``, else real and
    uninitialised (``torch.empty``). Shared tensors stay shared. Real tensors held as plain
    attributes (e.g. RoPE frequency tables, built on the CPU under ``init_empty_weights``) move to
    ``device``."""
    import torch

    memo = {}

    def new(t):
        if id(t) not in memo:
            with fake_mode if fake_mode is not None else contextlib.nullcontext():
                memo[id(t)] = torch.empty(t.shape, dtype=t.dtype, device=device)
        return memo[id(t)]

    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.device.type == "meta":
                sub._parameters[name] = torch.nn.Parameter(new(param), requires_grad=param.requires_grad)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None and buffer.device.type == "meta":
                sub._buffers[name] = new(buffer)
        for name, value in list(vars(sub).items()):
            if isinstance(value, torch.Tensor) and not name.startswith("_") and value.device.type == "cpu" and device != "cpu":
                setattr(sub, name, value.to(device))
    return module


def tracker_class():
    from torch.distributed._tools.mem_tracker import MemTracker

    class TrainableMemTracker(MemTracker):
        """MemTracker whose gradient hooks go on trainable parameters only (registering a hook on a
        frozen parameter raises)."""

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            frozen = [p for p in module.parameters() if not p.requires_grad]
            for param in frozen:  # no hook: mark them as seen
                self._param_to_grad_hook_handles.setdefault(param, (_NoHandle(), _NoHandle()))
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

        def _update_peak_stats(self, peak_state):
            # the step's peak only: MemTracker would also walk every tracked module after every op
            # for per-module peaks (thousands of modules here), which this benchmark does not report
            for device, snapshot in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < snapshot["Total"]:
                    self._peak_mem[device] = snapshot["Total"]
                    self._peak_mem_snap[device] = dict(snapshot)

    return TrainableMemTracker


class _NoHandle:
    def remove(self) -> None:
        pass


