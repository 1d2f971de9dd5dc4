"""DiTFeatures: diffusion-transformer features in the manner of DIFT."""

import pytest
import torch

from mosaic_kit.features import DiTFeatures, build_extractor

diffusers = pytest.importorskip("diffusers")


def _tiny_dit(in_channels=3, layers=3):
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=in_channels, out_channels=2 * in_channels,
        num_layers=layers, sample_size=16, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1,
    ).eval()


@pytest.mark.parametrize("grid_size", [8, (6, 10)])
def test_shapes_dtype_and_defaults(grid_size):
    dit = _tiny_dit()
    extractor = DiTFeatures(dit, timestep=50, ensemble_size=2, grid_size=grid_size)
    assert (extractor.layer, extractor.class_label, extractor.name) == (1, 10, "dit")
    out = extractor(torch.rand(2, 3, 16, 16))
    expected = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    assert out.shape == (2, 16, *expected) and out.dtype == torch.float32


def test_equals_a_plain_reimplementation_and_leaves_no_hooks():
    """Full forward, hook recording every draw, tokens laid out by hand: same features."""
    dit = _tiny_dit()
    images = torch.rand(2, 3, 16, 16)
    extractor = DiTFeatures(dit, timestep=300, layer=2, class_label=4, ensemble_size=3, seed=7)
    fast = extractor.extract(images)

    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    generator = torch.Generator().manual_seed(7)
    pixels = images * 2 - 1
    timesteps = torch.full((2,), 300)
    captured = []
    handle = dit.transformer_blocks[2].register_forward_hook(lambda m, a, o: captured.append(o))
    total = 0
    for _ in range(3):
        noise = torch.randn((1, 3, 16, 16), generator=generator).expand(2, -1, -1, -1)
        with torch.no_grad():
            dit(scheduler.add_noise(pixels, noise, timesteps), timestep=timesteps, class_labels=torch.full((2,), 4))
        tokens = captured[-1]  # (B, 64, 16): 8 × 8 patches, row-major
        total = total + tokens.transpose(1, 2).reshape(2, 16, 8, 8)
    handle.remove()
    torch.testing.assert_close(fast, total / 3)
    assert not dit.transformer_blocks[2]._forward_hooks
    assert not torch.equal(fast, DiTFeatures(dit, timestep=300, layer=2, class_label=5, ensemble_size=3, seed=7).extract(images))


def test_latent_dit_with_a_vae_and_the_factory(tmp_path):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
    ).eval()
    extractor = DiTFeatures(_tiny_dit(in_channels=4), vae=vae, input_size=32, ensemble_size=1, grid_size=4)
    assert extractor.downsample_factor == 4
    assert extractor(torch.rand(1, 3, 40, 40)).shape == (1, 16, 4, 4)
    _tiny_dit().save_pretrained(tmp_path / "transformer")
    built = build_extractor("dit", path_or_id=str(tmp_path), vae_subfolder=None, input_size=16, ensemble_size=1, grid_size=8)
    assert isinstance(built, DiTFeatures) and built(torch.rand(1, 3, 16, 16)).shape == (1, 16, 8, 8)
    assert build_extractor("dit", transformer=_tiny_dit()).name == "dit"


def test_bad_arguments():
    dit = _tiny_dit()
    with pytest.raises(ValueError, match=r"`layer` in \[0, 3\)"):
        DiTFeatures(dit, layer=3)
    with pytest.raises(ValueError, match=r"`class_label` in \[0, 10\]"):
        DiTFeatures(dit, class_label=11)
    with pytest.raises(ValueError, match=r"`timestep` in \[0, 1000\)"):
        DiTFeatures(dit, timestep=1000)
    with pytest.raises(ValueError, match=r"with in_channels=3 to denoise images \(no `vae`\), but got in_channels=4"):
        DiTFeatures(_tiny_dit(in_channels=4))
    with pytest.raises(ValueError, match="divisible by the DiT's downsampling factor 2"):
        DiTFeatures(dit, input_size=15)
    with pytest.raises(ValueError, match="DiTTransformer2DModel"):
        DiTFeatures(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiTFeatures.from_pretrained("unused", trust_remote_code=True)
