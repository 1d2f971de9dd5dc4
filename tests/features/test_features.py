"""Dense feature extractors: shapes, determinism, invariances, twins, bad inputs, optional deps."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import dreambench_for_tests
from kornia.color import rgb_to_grayscale
from kornia.feature import SIFTDescriptor

from mosaic_kit.features import (
    EXTRACTORS,
    DenseSIFT,
    DiffusionFeatures,
    DINOv2,
    FeatureExtractor,
    Precomputed,
    build_extractor,
)

GRIDS = [16, (12, 20)]


def _grid(grid_size):
    return (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)


def _smooth_images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Random images with structure at several scales (upsampled noise), values in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, height // 8, width // 8, generator=generator)
    fine = torch.rand(batch, 3, height, width, generator=generator)
    images = 0.8 * F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False) + 0.2 * fine
    return images.clamp(0, 1)


def _cosine_nearest(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """For each cell of `source` (C, gh, gw), the row-major index of its cosine nearest cell in `target`."""
    source = F.normalize(source.flatten(1), dim=0)
    target = F.normalize(target.flatten(1), dim=0)
    return (source.T @ target).argmax(dim=1)


def _photo(size: int) -> torch.Tensor:
    path = dreambench_for_tests() / "dog" / "00.jpg"
    image_module = pytest.importorskip("PIL.Image")
    image = image_module.open(path).convert("RGB").resize((size, size), image_module.BICUBIC)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
    return pixels.permute(2, 0, 1)[None].float() / 255


# ---------------------------------------------------------------------------------------------
# tiny models, built in code


def _tiny_dinov2(registers: int = 0):
    transformers = pytest.importorskip("transformers")
    kwargs = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8, image_size=64)
    torch.manual_seed(0)
    if registers:
        config = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **kwargs)
        return transformers.Dinov2WithRegistersModel(config).eval()
    return transformers.Dinov2Model(transformers.Dinov2Config(**kwargs)).eval()


def _tiny_unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    ).eval()


def _tiny_latent_unet_and_vae():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    ).eval()
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, sample_size=32,
    ).eval()
    return unet, vae


# ---------------------------------------------------------------------------------------------
# shapes and dtypes


@pytest.mark.parametrize("grid_size", GRIDS)
def test_sift_shape_dtype_and_unit_norm(grid_size):
    features = DenseSIFT(grid_size=grid_size, patch_size=16)(torch.rand(2, 3, 48, 80))
    assert features.shape == (2, 128, *_grid(grid_size)) and features.dtype == torch.float32
    torch.testing.assert_close(features.norm(dim=1), torch.ones(2, *_grid(grid_size)))
    assert DenseSIFT(grid_size=4, patch_size=8, num_ang_bins=4, num_spatial_bins=2)(torch.rand(1, 3, 16, 16)).shape == (1, 16, 4, 4)


@pytest.mark.parametrize("grid_size", GRIDS)
def test_dinov2_shape_and_dtype(grid_size):
    extractor = DINOv2(_tiny_dinov2(), input_size=(64, 48), grid_size=grid_size)
    features = extractor(torch.rand(2, 3, 50, 70))
    assert features.shape == (2, 32, *_grid(grid_size)) and features.dtype == torch.float32
    # input_size=None keeps each image's size, rounded to patches: 50×70 -> 48×72 -> 6×9 patches.
    assert DINOv2(_tiny_dinov2(), input_size=None).extract(torch.rand(1, 3, 50, 70)).shape == (1, 32, 6, 9)


@pytest.mark.parametrize("grid_size", GRIDS)
def test_diffusion_shape_and_dtype(grid_size):
    unet = _tiny_unet()
    for up_block, channels in [(0, 16), (1, 8)]:
        extractor = DiffusionFeatures(unet, timestep=50, up_block=up_block, ensemble_size=2, input_size=32, grid_size=grid_size)
        features = extractor(torch.rand(2, 3, 40, 24))
        assert features.shape == (2, channels, *_grid(grid_size)) and features.dtype == torch.float32


@pytest.mark.parametrize("grid_size", GRIDS)
def test_latent_diffusion_with_vae_shape_and_conditioning(grid_size):
    unet, vae = _tiny_latent_unet_and_vae()
    images = torch.rand(2, 3, 32, 32)
    zero = DiffusionFeatures(unet, up_block=1, vae=vae, ensemble_size=2, grid_size=grid_size)
    features = zero(images)
    assert features.shape == (2, 8, *_grid(grid_size)) and features.dtype == torch.float32
    prompt = torch.randn(3, 16)  # (S, D), shared by the batch
    conditioned = DiffusionFeatures(unet, up_block=1, vae=vae, encoder_hidden_states=prompt, ensemble_size=2, grid_size=grid_size)
    assert conditioned(images).shape == features.shape
    assert not torch.allclose(conditioned(images), features)


@pytest.mark.parametrize("grid_size", GRIDS)
def test_precomputed_shapes(grid_size):
    images = torch.rand(3, 3, 32, 32)
    grid = _grid(grid_size)
    assert Precomputed(torch.randn(5, 7, 9), grid_size=grid_size)(images).shape == (3, 5, *grid)
    assert Precomputed(torch.randn(3, 5, 7, 9), grid_size=grid_size)(images).shape == (3, 5, *grid)
    out = Precomputed(lambda x: x.double(), grid_size=grid_size)(images)
    assert out.shape == (3, 3, *grid) and out.dtype == torch.float32


def test_grid_is_row_major_over_the_image_and_native_grids_pass_unchanged():
    height, width = 32, 64
    rows = torch.arange(height, dtype=torch.float32).view(1, 1, height, 1).expand(1, 3, height, width) / height
    cols = torch.arange(width, dtype=torch.float32).view(1, 1, 1, width).expand(1, 3, height, width) / width
    ramp = Precomputed(lambda images: images, grid_size=(4, 8))
    by_row, by_col = ramp(rows)[0, 0], ramp(cols)[0, 0]
    # Cell (i, j) covers rows i*H/4 … (i+1)*H/4: its value is the mean of the ramp over the cell.
    torch.testing.assert_close(by_row[:, 0], (torch.arange(4) * 8 + 3.5) / height)
    torch.testing.assert_close(by_col[0, :], (torch.arange(8) * 8 + 3.5) / width)
    native = torch.randn(2, 5, 4, 8)
    assert torch.equal(Precomputed(native, grid_size=(4, 8))(torch.rand(2, 3, 8, 8)), native)


# ---------------------------------------------------------------------------------------------
# DenseSIFT: twin, invariances, real photo


def test_sift_equals_kornia_descriptor_on_the_centred_patch():
    images = _smooth_images(1, 64, 96)
    sift = DenseSIFT(grid_size=(8, 12), patch_size=16)
    features = sift(images)
    gray = rgb_to_grayscale(images)
    descriptor = SIFTDescriptor(16, rootsift=True)
    for row, col in [(3, 4), (4, 7), (2, 2)]:  # interior cells: 8-pixel cells centred at 8*i + 4
        top, left = 8 * row + 4 - 8, 8 * col + 4 - 8
        patch = gray[:, :, top : top + 16, left : left + 16]
        torch.testing.assert_close(features[0, :, row, col], descriptor(patch)[0])
    # A border cell sees the reflect-padded image.
    padded = F.pad(gray, (8, 8, 8, 8), mode="reflect")
    torch.testing.assert_close(features[0, :, 0, 0], descriptor(padded[:, :, 4:20, 4:20])[0])


def test_sift_chunking_and_batching_do_not_change_descriptors():
    images = _smooth_images(2, 64, 64)
    reference = DenseSIFT(grid_size=16, patch_size=16)(images)
    torch.testing.assert_close(DenseSIFT(grid_size=16, patch_size=16, chunk_size=7)(images), reference)
    torch.testing.assert_close(DenseSIFT(grid_size=16, patch_size=16)(images[1:]), reference[1:])
    assert torch.equal(DenseSIFT(grid_size=16, patch_size=16)(images), reference)  # deterministic


def test_sift_is_translation_equivariant_by_whole_cells():
    # A 32×32 grid of 4-pixel cells: shift the crop by 3 cells right and 2 down.
    cell, shift_rows, shift_cols, size, grid = 4, 2, 3, 128, 32
    canvas = _smooth_images(1, size + cell * shift_rows, size + cell * shift_cols, seed=3)
    original = canvas[:, :, :size, :size]
    shifted = canvas[:, :, cell * shift_rows :, cell * shift_cols :]
    sift = DenseSIFT(grid_size=grid, patch_size=16)
    a, b = sift(original), sift(shifted)
    # Cell (i, j) of `shifted` sees what cell (i + 2, j + 3) of `original` sees, wherever neither
    # patch touches a border: patches reach 8 pixels = 2 cells past their centre.
    margin = 2
    inner_a = a[..., margin + shift_rows : grid - margin, margin + shift_cols : grid - margin]
    inner_b = b[..., margin : grid - margin - shift_rows, margin : grid - margin - shift_cols]
    torch.testing.assert_close(inner_b, inner_a, atol=1e-5, rtol=1e-5)


def test_sift_is_invariant_to_affine_intensity_changes():
    images = _smooth_images(1, 64, 64, seed=1)
    sift = DenseSIFT(grid_size=16, patch_size=16)
    torch.testing.assert_close(sift(0.5 * images + 0.25), sift(images), atol=1e-4, rtol=1e-4)


def test_sift_matches_a_real_photo_to_itself():
    photo = _photo(256)
    sift = DenseSIFT(grid_size=64)
    features = sift(photo)[0]
    identity = torch.arange(64 * 64)
    self_match = (_cosine_nearest(features, features) == identity).float().mean()
    assert self_match > 0.9, f"self-match recovered {self_match:.1%} of cells"
    # Brightness/contrast change (still in [0, 1]): SIFT gradients normalise it away.
    changed = sift(0.7 * photo + 0.2)[0]
    photometric = (_cosine_nearest(changed, features) == identity).float().mean()
    assert photometric > 0.9, f"photometric match recovered {photometric:.1%} of cells"


def test_sift_matches_a_real_photo_to_its_translate():
    # 4-pixel cells: the second crop starts 2 cells lower and 3 cells further right.
    photo = _photo(256 + 12)
    first, second = photo[:, :, :256, :256], photo[:, :, 8 : 8 + 256, 12 : 12 + 256]
    sift = DenseSIFT(grid_size=64)
    nearest = _cosine_nearest(sift(second)[0], sift(first)[0]).view(64, 64)
    rows, cols = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    expected = (rows + 2) * 64 + (cols + 3)
    inside = (rows < 62) & (cols < 61)  # cells whose counterpart lies in the first crop
    recovered = (nearest == expected)[inside].float().mean()
    assert recovered > 0.9, f"translation recovered {recovered:.1%} of cells"


# ---------------------------------------------------------------------------------------------
# DINOv2: twin of the pipeline, layers, registers, loading


def test_dinov2_equals_a_plain_reimplementation():
    model = _tiny_dinov2()
    images = torch.rand(2, 3, 40, 56)
    extractor = DINOv2(model, layer=1, input_size=(32, 48), grid_size=(8, 12), layernorm=False)
    resized = F.interpolate(images, size=(32, 48), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        hidden = model(pixel_values=(resized - mean) / std, output_hidden_states=True).hidden_states[1]
    patches = hidden[:, 1:].reshape(2, 4, 6, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(patches, size=(8, 12), mode="bilinear", align_corners=False)
    torch.testing.assert_close(extractor(images), expected)


def test_dinov2_last_layer_with_layernorm_is_the_model_output():
    model = _tiny_dinov2()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        last = model(pixel_values=(images - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
                     / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)).last_hidden_state
    expected = last[:, 1:].reshape(1, 8, 8, 32).permute(0, 3, 1, 2)
    torch.testing.assert_close(DINOv2(model, input_size=64, grid_size=8)(images), expected)
    assert not torch.allclose(DINOv2(model, layer=0, input_size=64, grid_size=8)(images), expected)


def test_dinov2_drops_register_tokens():
    model = _tiny_dinov2(registers=2)
    images = torch.rand(1, 3, 32, 32)
    extractor = DINOv2(model, layer=-1, input_size=32, grid_size=4, layernorm=False)
    assert extractor.num_prefix_tokens == 3
    with torch.no_grad():
        pixels = (images - extractor.mean) / extractor.std
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(extractor(images), hidden[:, 3:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2))


def test_dinov2_from_pretrained_local_folder_and_factory(tmp_path):
    model = _tiny_dinov2()
    model.save_pretrained(tmp_path)
    images = torch.rand(1, 3, 64, 64)
    expected = DINOv2(model, input_size=64, grid_size=8)(images)
    loaded = DINOv2.from_pretrained(str(tmp_path), input_size=64, grid_size=8)
    torch.testing.assert_close(loaded(images), expected)
    built = build_extractor("dinov2", path_or_id=str(tmp_path), input_size=64, grid_size=8)
    assert built.name == "dinov2"
    torch.testing.assert_close(built(images), expected)
    assert build_extractor("dinov2", model=model, input_size=64).name == "dinov2"
    with pytest.raises(ValueError, match="trust_remote_code"):
        DINOv2.from_pretrained(str(tmp_path), trust_remote_code=True)


# ---------------------------------------------------------------------------------------------
# DiffusionFeatures: twin, determinism, hooks, loading


def test_diffusion_equals_a_plain_reimplementation_and_leaves_no_hooks():
    unet = _tiny_unet()
    images = torch.rand(2, 3, 32, 32)
    extractor = DiffusionFeatures(unet, timestep=300, up_block=0, ensemble_size=3, seed=7, grid_size=16)
    features = extractor(images)
    assert not unet.up_blocks[0]._forward_hooks and "forward" not in vars(unet)

    # The twin: the full forward, the up block's output read by a hook that lets the UNet finish.
    scheduler = extractor.scheduler
    generator = torch.Generator().manual_seed(7)
    timesteps = torch.full((2,), 300)
    outputs = []
    handle = unet.up_blocks[0].register_forward_hook(lambda module, args, output: outputs.append(output))
    with torch.no_grad():
        for _ in range(3):
            noise = torch.randn(1, 3, 32, 32, generator=generator).expand(2, -1, -1, -1)
            unet(scheduler.add_noise(images * 2 - 1, noise, timesteps), timesteps)
    handle.remove()
    expected = F.interpolate(torch.stack(outputs).mean(0), size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(features, expected)


def test_diffusion_is_deterministic_per_seed_and_independent_of_the_batch():
    unet = _tiny_unet()
    images = torch.rand(3, 3, 32, 32)
    extractor = DiffusionFeatures(unet, up_block=1, ensemble_size=2, seed=1, grid_size=8)
    features = extractor(images)
    assert torch.equal(features, extractor(images))
    torch.testing.assert_close(extractor(images[1:2]), features[1:2])
    torch.testing.assert_close(DiffusionFeatures(unet, up_block=1, ensemble_size=2, seed=1, grid_size=8)(images), features)
    assert not torch.allclose(DiffusionFeatures(unet, up_block=1, ensemble_size=2, seed=2, grid_size=8)(images), features)


def test_diffusion_from_pretrained_local_folders_and_factory(tmp_path):
    unet, vae = _tiny_latent_unet_and_vae()
    unet.save_pretrained(tmp_path / "unet")
    vae.save_pretrained(tmp_path / "vae")
    images = torch.rand(1, 3, 32, 32)
    expected = DiffusionFeatures(unet, vae=vae, ensemble_size=1, grid_size=8)(images)
    loaded = DiffusionFeatures.from_pretrained(str(tmp_path), input_size=32, ensemble_size=1, grid_size=8)
    assert loaded.vae is not None and loaded.conditional
    torch.testing.assert_close(loaded(images), expected)
    built = build_extractor("dift", path_or_id=str(tmp_path), input_size=32, ensemble_size=1, grid_size=8)
    torch.testing.assert_close(built(images), expected)

    pixel_unet = _tiny_unet()
    pixel_unet.save_pretrained(tmp_path / "pixel")
    pixel = DiffusionFeatures.from_pretrained(str(tmp_path / "pixel"), subfolder=None, input_size=32, ensemble_size=1)
    assert pixel.vae is None and not pixel.conditional
    assert pixel.scheduler.config.beta_schedule == "linear" and loaded.scheduler.config.beta_schedule == "scaled_linear"

    vae.save_pretrained(tmp_path / "not_a_unet")
    with pytest.raises(ValueError, match="UNet2DModel"):
        DiffusionFeatures.from_pretrained(str(tmp_path), subfolder="not_a_unet")


# ---------------------------------------------------------------------------------------------
# factory, bad inputs, optional dependencies


def test_build_extractor_names():
    assert EXTRACTORS == ("sift", "dinov2", "dift", "dit", "precomputed")
    sift = build_extractor("sift", grid_size=8, patch_size=8)
    assert isinstance(sift, DenseSIFT) and sift.name == "sift" and sift.grid_size == (8, 8)
    assert build_extractor("precomputed", features=torch.zeros(2, 3, 3)).name == "precomputed"
    with pytest.raises(ValueError, match=r"one of \['sift', 'dinov2', 'dift', 'dit', 'precomputed'\], but got 'dino'"):
        build_extractor("dino")


def test_build_extractor_from_a_model():
    assert build_extractor("dift", unet=_tiny_unet(), up_block=0).name == "dift"


@pytest.mark.parametrize(
    "images, match",
    [
        (torch.rand(3, 64, 64), r"Expected `images` of shape \(B, 3, H, W\), but got \(3, 64, 64\)\."),
        (torch.rand(1, 4, 64, 64), r"Expected `images` of shape \(B, 3, H, W\), but got \(1, 4, 64, 64\)\."),
        (torch.rand(0, 3, 64, 64), r"B, H, W >= 1"),
        (torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8), "floating dtype.*torch.uint8"),
        (torch.rand(1, 3, 64, 64) * 255, r"values in \[0, 1\], but got values in"),
        (torch.full((1, 3, 64, 64), -0.01), r"values in \[0, 1\]"),
        (torch.full((1, 3, 64, 64), float("nan")), r"values in \[0, 1\]"),
        ([[0.5]], "torch.Tensor of shape"),
    ],
)
def test_bad_images_raise(images, match):
    with pytest.raises(ValueError, match=match):
        DenseSIFT(grid_size=4, patch_size=8)(images)
    with pytest.raises(ValueError, match=match):
        Precomputed(torch.zeros(1, 2, 2))(images)


def test_images_within_the_slack_are_accepted():
    images = torch.rand(1, 3, 32, 32)
    images[0, 0, 0, 0], images[0, 0, 0, 1] = -5e-4, 1 + 5e-4
    assert DenseSIFT(grid_size=4, patch_size=8)(images).shape == (1, 128, 4, 4)
    assert DenseSIFT(grid_size=4, patch_size=8)(images.double()).dtype == torch.float32


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: DenseSIFT(grid_size=0), "`grid_size` >= 1"),
        (lambda: DenseSIFT(grid_size=(4, 4, 4)), "`grid_size` to be an integer or a pair"),
        (lambda: DenseSIFT(grid_size=4.0), "`grid_size` to be an integer or a pair"),
        (lambda: DenseSIFT(grid_size=(4, True)), r"`grid_size\[1\]` to be an integer"),
        (lambda: DenseSIFT(patch_size=2), "`patch_size` >= 4"),
        (lambda: DenseSIFT(chunk_size=0), "`chunk_size` >= 1"),
        (lambda: DenseSIFT(rootsift=1), "`rootsift` to be a bool"),
        (lambda: Precomputed("features"), "callable or a float tensor, but got str"),
        (lambda: Precomputed(torch.zeros(2, 2, dtype=torch.float32)), r"shape \(C, h, w\) or \(N, C, h, w\)"),
        (lambda: Precomputed(torch.zeros(1, 2, 2, 2, dtype=torch.long)), "float tensor"),
    ],
)
def test_bad_arguments_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_model_arguments_raise():
    model = _tiny_dinov2()
    with pytest.raises(ValueError, match=r"`layer` in \[-3, 2\].*but got 3"):
        DINOv2(model, layer=3)
    with pytest.raises(ValueError, match="`input_size` to be a multiple of the patch size 8, but got 60"):
        DINOv2(model, input_size=60)
    with pytest.raises(ValueError, match="Expected `model` to be a transformers Dinov2Model"):
        DINOv2(torch.nn.Linear(2, 2))

    unet = _tiny_unet()
    with pytest.raises(ValueError, match=r"`timestep` in \[0, 1000\), but got 1000"):
        DiffusionFeatures(unet, timestep=1000)
    with pytest.raises(ValueError, match=r"`up_block` in \[0, 2\).*but got 2"):
        DiffusionFeatures(unet, up_block=2)
    with pytest.raises(ValueError, match="`ensemble_size` >= 1"):
        DiffusionFeatures(unet, ensemble_size=0)
    with pytest.raises(ValueError, match="divisible by the UNet's downsampling factor 2, but got 33 × 33"):
        DiffusionFeatures(unet, input_size=33)
    with pytest.raises(ValueError, match="divisible by the UNet's downsampling factor 2, but got 31 × 32"):
        DiffusionFeatures(unet, up_block=0)(torch.rand(1, 3, 31, 32))
    with pytest.raises(ValueError, match="no `encoder_hidden_states` for a UNet without cross-attention"):
        DiffusionFeatures(unet, encoder_hidden_states=torch.zeros(1, 4))
    _, vae = _tiny_latent_unet_and_vae()
    with pytest.raises(ValueError, match="in_channels=4 to denoise the VAE's latents, but got in_channels=3"):
        DiffusionFeatures(unet, vae=vae)


def test_bad_features_at_call_time_raise():
    with pytest.raises(ValueError, match=r"batch 1 or 3 \(the images'\), but got \(2, 4, 2, 2\)"):
        Precomputed(torch.zeros(2, 4, 2, 2))(torch.rand(3, 3, 8, 8))
    with pytest.raises(ValueError, match=r"return shape \(1, C, h, w\), but got \(4, 2, 2\)"):
        Precomputed(lambda images: torch.zeros(4, 2, 2))(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="return a float tensor, but got torch.int64"):
        Precomputed(lambda images: torch.zeros(1, 4, 2, 2, dtype=torch.long))(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="larger than half of patch_size=32"):
        DenseSIFT(grid_size=2)(torch.rand(1, 3, 8, 8))
    with pytest.raises(NotImplementedError):
        FeatureExtractor()(torch.rand(1, 3, 8, 8))

    class FlatFeatures(FeatureExtractor):
        def extract(self, images):
            return images.flatten(1)

    with pytest.raises(ValueError, match=r"`FlatFeatures.extract` to return features of shape \(2, C, h, w\), but got \(2, 192\)"):
        FlatFeatures()(torch.rand(2, 3, 8, 8))


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError, match=r"DINOv2.from_pretrained needs `transformers`.*pip install mosaic_kit\[flux\]"):
        DINOv2.from_pretrained("facebook/dinov2-small")
    with pytest.raises(ImportError, match=r"pip install mosaic_kit\[flux\]"):
        build_extractor("dinov2", path_or_id="facebook/dinov2-small")


def test_missing_diffusers_names_the_extra(monkeypatch):
    unet = _tiny_unet()
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match=r"DiffusionFeatures.from_pretrained needs `diffusers`.*mosaic_kit\[flux\]"):
        DiffusionFeatures.from_pretrained("stabilityai/stable-diffusion-2-1")
    # Without a scheduler of its own, the extractor builds one with diffusers.
    with pytest.raises(ImportError, match=r"DiffusionFeatures needs `diffusers`.*mosaic_kit\[flux\]"):
        DiffusionFeatures(unet)


def test_features_module_imports_no_optional_dependency():
    import subprocess

    code = (
        "import sys; import mosaic_kit.features; "
        "print(sorted(m for m in ('transformers', 'diffusers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
