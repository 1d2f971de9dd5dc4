"""One training step of a configuration at real size, built through the family's plug-in point.

The registry's family (`mosaic_kit.pipelines.get_family`) gives the bare transformer class, the
training denoiser around it with its LoRA (`ModelFamily.bare_denoiser`) and the inputs as its
encoding lays them out (`ModelFamily.bare_model_kwargs`): this module never names a family. The
model is built on the ``meta`` device (``accelerate.init_empty_weights``), the LoRA added and the
base cast to bf16 there (``.to()`` cannot swap fake parameters), the frozen linears optionally
replaced by a quantized layout (`memory.quantized`), then every parameter becomes a fake CPU tensor.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from pathlib import Path

from .configs import EMA_DECAY, ENCODERS
from .fakes import GpuAutocastPolicy, fake_mode, materialise, policy_checkpoint, real, tracker_class
from .quantized import quantize_linears


def family_class(cfg: dict):
    """The registered `ModelFamily` class of a configuration."""
    from mosaic_kit.pipelines import get_family

    return get_family(cfg["family"]).family_class


def build_model(cfg: dict, device: str = "cpu", fake_mode=None, quantize: str = "none"):
    """The configuration's denoiser with its LoRA: base in bf16 (or ``quantize``'s layout), LoRA in
    fp32, gradient checkpointing on; built on meta, then materialised (fake under ``fake_mode``).

    Returns ``(model, transformer, family)``."""
    import torch
    from accelerate import init_empty_weights
    from diffusers.training_utils import cast_training_params

    family = family_class(cfg)
    if device == "cuda" and quantize != "none":
        return _build_with_backend(cfg, family, quantize)
    with init_empty_weights(include_buffers=False):  # parameters on meta, RoPE tables real
        transformer = family.bare_transformer_class()(**dict(cfg["transformer"]))
        model = family.bare_denoiser(transformer, cfg["rank"])
    transformer.requires_grad_(False)
    for name, param in transformer.named_parameters():
        param.requires_grad_(".lora_" in name)
    transformer.to(torch.bfloat16)
    cast_training_params(transformer, dtype=torch.float32)  # trainable weights train in fp32 (as the trainer)
    if quantize != "none":
        quantize_linears(transformer, quantize)
    materialise(model, fake_mode, device)
    # non-reentrant checkpointing as diffusers' default; on the CPU the recomputation enters the
    # GPU autocast policy itself (a backward pass does not see a mode entered around the forward)
    transformer.enable_gradient_checkpointing(policy_checkpoint if device == "cpu" else None)
    transformer.train()
    return model, transformer, family


def _build_with_backend(cfg: dict, family, quantize: str):
    """On a GPU, the quantized base through the real backend (what ``model.quantize`` runs:
    `mosaic_kit.models.quantize.quantize_transformer`, diffusers' quantizer of torchao or
    bitsandbytes) instead of the modelled layout; the LoRA then goes on top through peft as in
    training. Needs the backend installed (scripts/gpu_check.sh checks before asking)."""
    import torch
    from accelerate import init_empty_weights
    from diffusers.training_utils import cast_training_params

    from mosaic_kit.models.quantize import quantize_transformer

    with init_empty_weights(include_buffers=False):
        transformer = family.bare_transformer_class()(**dict(cfg["transformer"]))
    transformer.to_empty(device="cpu").to(torch.bfloat16)  # uninitialised: values do not change memory
    transformer = quantize_transformer(transformer, quantize, torch.bfloat16)
    if not any(p.is_cuda for p in transformer.parameters()):
        transformer.to("cuda")  # torchao quantizes on the CPU; bitsandbytes places itself on the GPU
    model = family.bare_denoiser(transformer, cfg["rank"])
    for name, param in transformer.named_parameters():
        param.requires_grad_(".lora_" in name)
    cast_training_params(transformer, dtype=torch.float32)
    if not all(p.is_cuda for p in model.parameters()):
        model.to("cuda")
    transformer.enable_gradient_checkpointing()
    transformer.train()
    return model, transformer, family


def token_counts(cfg: dict) -> tuple[int, int]:
    """``(N_tgt, N^(k))``: target and per-reference image tokens (16 px per token)."""
    return (cfg["size"] // 16) ** 2, (cfg["ref_size"] // 16) ** 2


def correspondences(cfg: dict, seed: int = 0):
    """``points`` random annotated pairs per reference, target tokens disjoint across references (eq. 2)."""
    from mosaic_kit.correspondence import Correspondences

    n_tgt, n_ref = token_counts(cfg)
    refs, points = cfg["refs"], min(cfg["points"], n_ref)
    rng = random.Random(seed)
    targets = rng.sample(range(n_tgt), min(n_tgt, refs * points))
    dicts = []
    for k in range(refs):
        sources = rng.sample(range(n_ref), points)
        dicts.append({u: targets[(k * points + j) % len(targets)] for j, u in enumerate(sources)})
    return dicts, Correspondences.from_dicts([dicts], [n_ref] * refs, n_tgt)


def _released_capture_class():
    """``bench_capture.ReleasedStyleCapture`` (the released code's capture, restated), with the
    correspondences the in-sequence processors check the layout against."""
    import importlib.util

    name = "bench_capture"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench_capture.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)

    class DenseMaps(module.ReleasedStyleCapture):
        def __init__(self, corr):
            super().__init__(corr.ref_tokens)
            self.corr = corr

    return DenseMaps


class Step:
    """One training step of a configuration, built once (model, inputs, optimiser, EMA).

    Args:
        cfg: a configuration of `memory.configs.CONFIGS`.
        device: ``"cpu"`` (fake or real tensors) or ``"cuda"``.
        fake: fake tensors (no storage) instead of real uninitialised ones.
        quantize: the frozen base's layout: ``"none"`` (bf16) or one of `memory.quantized.QUANTIZED_LAYOUTS`.
    """

    def __init__(self, cfg: dict, device: str = "cpu", fake: bool = True, quantize: str = "none") -> None:
        import torch
        from diffusers.training_utils import EMAModel

        self.cfg, self.device, self.quantize = cfg, device, quantize
        self.fake_mode = fake_mode() if fake else None
        inside = self.fake_mode if fake else contextlib.nullcontext()
        self.model, self.transformer, family = build_model(cfg, device, self.fake_mode, quantize)
        self.params = [p for p in self.transformer.parameters() if p.requires_grad]

        def randn(*shape, dtype):
            with inside:
                return torch.randn(*shape, dtype=dtype, device=device)

        torch.manual_seed(0)
        # the cached-conditioning view of one sample; ids and layouts are real constants
        self.inputs = family.bare_model_kwargs(self.transformer, cfg["size"], [cfg["ref_size"]] * cfg["refs"],
                                               cfg["text_tokens"], randn)
        self.inputs = {k: v.to(device) if isinstance(v, torch.Tensor) and v.device.type != device else v
                       for k, v in self.inputs.items()}
        with inside:
            n_tgt = token_counts(cfg)[0]
            channels = self.transformer.config.in_channels  # packed latent channels (Qwen: 4 × 16)
            self.latents = torch.randn(1, n_tgt, channels, device=device)
            self.noise = torch.randn(1, n_tgt, channels, device=device)
            # AdamW in steady state: its moments exist before the measured step (foreach, as on a GPU)
            self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2,
                                               foreach=True)
            for p in self.params:
                self.optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p),
                                           "exp_avg_sq": torch.zeros_like(p)}
            self.ema = EMAModel(self.params, decay=EMA_DECAY)
        self.dicts, corr = correspondences(cfg)
        self.corr = corr.to(device) if not fake else corr

    def base_bytes(self) -> tuple[int, int]:
        """``(frozen base, trainable)`` parameter bytes (the frozen base in its stored layout)."""
        frozen = trainable = 0
        for p in self.transformer.parameters():
            size = p.numel() * p.element_size()
            if p.requires_grad:
                trainable += size
            else:
                frozen += size
        return frozen, trainable

    def inputs_tensors(self) -> list:
        """Every input tensor of the step (model inputs, latents, noise)."""
        import torch

        return [v for v in list(self.inputs.values()) + [self.latents, self.noise] if isinstance(v, torch.Tensor)]

    def captures(self, mode: str) -> list:
        import torch

        from mosaic_kit.attention import RefTargetCapture

        if mode == "plain":
            return []
        if mode == "mosaic":
            with real():  # its block counter and index tensors: real constants, built before the step
                capture = RefTargetCapture(self.corr, aggregate="points")
                capture.prepare(torch.device(self.device), torch.float32, self.transformer.config.num_attention_heads)
            return [capture]
        with real():  # its block counter: a real constant
            return [_released_capture_class()(self.corr)]

    def loss(self, mode: str, prediction, captures):
        import torch

        from mosaic_kit.losses import MosaicObjective, flow_matching_loss

        if mode == "dense":
            flow = torch.nn.functional.mse_loss(prediction.float(), self.noise - self.latents)
            return flow + captures[0].loss(self.dicts, scal_weight=0.1, mdl_weight=1.0)
        objective = MosaicObjective.from_preset("paper", mdl_divergence="jsd")
        if mode == "plain":  # the trainer without a capture: flow matching alone
            return flow_matching_loss(prediction.float(), self.noise, self.latents)
        result = captures[0].result()
        return objective(prediction.float(), self.noise, self.latents, result, self.corr, step=0).loss

    def run(self, mode: str) -> None:
        """Forward, loss, backward, clipping, optimiser step, EMA (what MemTracker measures)."""
        from mosaic_kit import finite_checks

        with finite_checks(False):  # a step past the trainer's first ones (check_finite_steps): no syncs
            self._run(mode)

    def _run(self, mode: str) -> None:
        import torch

        captures = self.captures(mode)
        with torch.autocast(self.device, dtype=torch.bfloat16):
            prediction = self.model(**self.inputs, capture=captures or None)
        loss = self.loss(mode, prediction, captures)
        del prediction
        loss.backward()
        del loss, captures
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step(self.params)

    def policy(self):
        """CUDA's autocast policy for the CPU run (a no-op on CUDA, which has it)."""
        return GpuAutocastPolicy() if self.device == "cpu" else contextlib.nullcontext()


def measure_fake(cfg: dict, mode: str, flops: bool = True, quantize: str = "none") -> dict:
    """Peak of one step by category (MemTracker over fake tensors), and its FLOPs."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    began = time.perf_counter()
    step = Step(cfg, "cpu", fake=True, quantize=quantize)
    frozen, trainable = step.base_bytes()
    tracker = tracker_class()()
    tracker.track_external(step.transformer, step.optimizer, step.ema.shadow_params, *step.inputs_tensors())
    with step.fake_mode, step.policy():
        with tracker:
            step.run(mode)
        if flops:  # a second step: FlopCounterMode's module tracking keeps activations alive, so not under MemTracker
            counter = FlopCounterMode(display=False)
            with counter:
                step.run(mode)
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    result = {"mode": mode, "quantize": quantize, "peak_bytes": int(peak["Total"]),
              "by_category": {str(k): int(v) for k, v in peak.items() if k != "Total"},
              "base_bytes": frozen, "lora_bytes": trainable, "seconds": time.perf_counter() - began}
    if flops:
        result["flops"] = int(counter.get_total_flops())
    return result


def measure_real(cfg: dict, mode: str, device: str = "cpu", quantize: str = "none") -> dict:
    """The same step on real tensors: on CUDA ``torch.cuda.max_memory_allocated`` (everything the
    step holds, weights included), on the CPU MemTracker over real tensors and, independently,
    the allocator's own accounting through torch's profiler (``profile_memory``). A quantized base
    is, on CUDA, the real backend's (`_build_with_backend`), on the CPU the modelled layout
    (`memory.quantized`) on real tensors."""
    import torch

    began = time.perf_counter()
    step = Step(cfg, device, fake=False, quantize=quantize)
    # the weights stay uninitialised: values do not change what a step allocates
    frozen, trainable = step.base_bytes()
    result = {"mode": mode, "quantize": quantize, "base_bytes": frozen, "lora_bytes": trainable}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with step.policy():
            step.run(mode)
        torch.cuda.synchronize()
        result["peak_bytes"] = int(torch.cuda.max_memory_allocated())
    else:
        tracker = tracker_class()()
        tracker.track_external(step.transformer, step.optimizer, step.ema.shadow_params, *step.inputs_tensors())
        before = _allocated_cpu_bytes(step)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, step.policy(), tracker:
            step.run(mode)
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
        result["peak_bytes"] = int(peak["Total"])
        result["by_category"] = {str(k): int(v) for k, v in peak.items() if k != "Total"}
        result["held_bytes"] = before  # what the step holds before it runs
        result["allocator_peak_bytes"] = before + _profiler_peak(prof)
    result["seconds"] = time.perf_counter() - began
    return result
def _allocated_cpu_bytes(step) -> int:
    """Bytes of every tensor the step holds before it runs (weights, optimiser state, EMA, inputs)."""
    seen, total = set(), 0
    tensors = list(step.transformer.parameters()) + list(step.transformer.buffers()) + step.inputs_tensors()
    tensors += list(step.ema.shadow_params)
    for state in step.optimizer.state.values():
        tensors += [v for v in state.values() if hasattr(v, "untyped_storage")]
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _profiler_peak(prof) -> int:
    """The allocator's peak above the start of profiling: the running sum of the CPU allocator's
    allocation and free events (``profile_memory=True``), in time order."""
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def encoder_bytes(key: str | None) -> list[dict]:
    """Parameter bytes in bf16 of the family's frozen encoders, built on meta from their configs."""
    import torch

    rows = []
    for name, cls_name, config in ENCODERS.get(key or "", []):
        with torch.device("meta"):
            if cls_name.startswith("Autoencoder"):
                import diffusers

                module = getattr(diffusers, cls_name)(**config)
            elif cls_name == "Qwen2_5_VisionTransformerPretrainedModel":
                from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
                from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

                module = Qwen2_5_VisionTransformerPretrainedModel._from_config(Qwen2_5_VLVisionConfig(**config))
            else:
                import transformers

                model_cls = getattr(transformers, cls_name)
                config_cls = model_cls.config_class
                module = model_cls(config_cls(**config))
        seen, params = set(), 0
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params += p.numel()
        rows.append({"name": name, "parameters": params, "bytes_bf16": 2 * params})
    return rows


