"""MOSAIC in your own DiT, minimal: a LoRA on a tiny random SD3 with K = 2 references, SCAL + MDL.

The references go into the target's sequence the in-context way: the target latent and the two
reference latents side by side on one canvas, so the stock SD3 forward runs unchanged. MOSAIC
adds its capture processors through diffusers' ``set_attn_processor`` and reads the reference →
target attention of every block. Lines that concern MOSAIC end with ``# MOSAIC`` (see
docs/guide/any-dit.md for every step, and for FLUX.1-Kontext, FLUX.2 and Qwen-Image).

    PYTHONPATH=. python recipes/any_dit_minimal.py [--steps 20] [--output losses.json]

Runs on one CPU thread in a few seconds. The data is synthetic: the target's left half is
reference 1's left half and its right half is reference 2's right half, so the correspondences
are known exactly.
"""

import argparse
import json

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from peft import LoraConfig

from mosaic_kit.attention import RefTargetCapture  # MOSAIC
from mosaic_kit.correspondence import Correspondences  # MOSAIC
from mosaic_kit.losses import MosaicObjective  # MOSAIC
from mosaic_kit.models import SequenceLayout, install_capture_processors  # MOSAIC

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], usage=argparse.SUPPRESS)  # errors: one line
parser.add_argument("--steps", type=int, default=20, help="optimisation steps, at least 5 (default 20)")
parser.add_argument("--output", metavar="FILE", help="write the losses of every step to this JSON file")
args, unknown = parser.parse_known_args()
if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)}; accepted: -h, --help, --steps, --output")
if args.steps < 5:  # the summary compares the first and the last five steps
    parser.error(f"argument --steps: expected at least 5, but got {args.steps}")
torch.set_num_threads(1)
torch.manual_seed(0)

# A tiny random SD3 (a real one: SD3Transformer2DModel.from_pretrained(repo, subfolder="transformer")).
model = SD3Transformer2DModel(
    sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32,
    pos_embed_max_size=24, qk_norm="rms_norm",
)
model.requires_grad_(False)
model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                             target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

# Synthetic data: B samples, two 16x16 reference latents and a target made of their halves.
B, C, S = 2, 4, 16  # batch, latent channels, latent side (8x8 tokens with patch 2)
refs = torch.randn(B, 2, C, S, S)
target = torch.cat([refs[:, 0, ..., : S // 2], refs[:, 1, ..., S // 2 :]], dim=-1)
text, pooled = torch.randn(B, 4, 32), torch.randn(B, 32)

# Canvas [target | ref 1 | ref 2]: 8x24 tokens; correspondences in each image's own row-major tokens.
layout = SequenceLayout.from_canvas((8, 24), target=(0, 0, 8, 8), references=[(0, 8, 8, 8), (0, 16, 8, 8)])  # MOSAIC
halves = [{r * 8 + c: r * 8 + c for r in range(8) for c in cols} for cols in (range(4), range(4, 8))]  # MOSAIC
corr = Correspondences.from_dicts([halves] * B, ref_tokens=[64, 64], tgt_tokens=64)  # MOSAIC
handle = install_capture_processors(model)  # MOSAIC: every block's joint attention feeds
objective = MosaicObjective(scal_weight=0.4, mdl_weight=0.6)  # MOSAIC: eq. 15 weights of the paper

history = []
for step in range(args.steps):
    noise, t = torch.randn_like(target), torch.rand(B)
    noisy = (1 - t.view(B, 1, 1, 1)) * target + t.view(B, 1, 1, 1) * noise  # rectified flow, as SD3
    canvas = torch.cat([noisy, refs[:, 0], refs[:, 1]], dim=-1)  # clean references beside the target
    with handle.capture(RefTargetCapture(corr, aggregate="points"), layout) as capture:  # MOSAIC
        prediction = model(canvas, text, pooled, timestep=t * 1000).sample
    diffusion = F.mse_loss(prediction[..., :S], noise - target)  # the target's part of the canvas
    out = objective.combine(diffusion, capture.result(), corr, step=step)  # MOSAIC
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    history.append({k: getattr(out, k).item() for k in ("loss", "diffusion", "scal", "mdl")})
    print(f"step {step:2d}  " + "  ".join(f"{k} {v:.4f}" for k, v in history[-1].items()), flush=True)

handle.remove()
first, last = history[:5], history[-5:]  # each step draws new noise and t: compare five-step means
for name in ("scal", "mdl"):
    print(f"{name.upper()} mean of the first 5 steps {sum(h[name] for h in first) / len(first):.4f}, "
          f"of the last 5 {sum(h[name] for h in last) / len(last):.4f}")
if args.output:
    with open(args.output, "w") as f:
        json.dump(history, f, indent=1)
