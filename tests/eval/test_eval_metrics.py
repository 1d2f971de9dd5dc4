"""mosaic_kit.eval: CLIP-I / CLIP-T / DINO, multi-subject crops, attention hit rate, sheets."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")

from helpers import random_corr

from mosaic_kit.attention import dense_ref_target_attention
from mosaic_kit.correspondence import TokenGrid
from mosaic_kit.eval import (
    SheetRow,
    attention_hit_rate,
    contact_sheet,
    mean_similarity,
    similarity_matrix,
    sliding_crops,
    subject_similarity,
    tiny_clip_scorer,
    tiny_dino_scorer,
)


def noise_images(count: int, seed: int, size=(40, 40)) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
        out.append(Image.frombytes("RGB", size, bytes(pixels.flatten().tolist())))
    return out


@pytest.fixture(scope="module")
def clip():
    return tiny_clip_scorer(seed=0, batch_size=3)


@pytest.fixture(scope="module")
def dino():
    return tiny_dino_scorer(seed=0, batch_size=3)


# -- CLIP-I, CLIP-T, DINO ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_an_image_compared_with_itself_scores_100(seed):
    images = noise_images(4, seed=seed, size=(48, 36)) + [Image.new("RGB", (20, 30), "orange")]
    clip, dino = tiny_clip_scorer(seed=seed), tiny_dino_scorer(seed=seed)
    for image in images:
        assert clip.clip_i([image], [image]).item() == pytest.approx(100.0, abs=1e-3)
        assert dino.dino([image], [image]).item() == pytest.approx(100.0, abs=1e-3)
    # and the diagonal of the pairwise matrix
    for scorer in (clip, dino):
        matrix = similarity_matrix(scorer.embed_images(images), scorer.embed_images(images))
        torch.testing.assert_close(matrix.diagonal(), torch.full((len(images),), 100.0), atol=1e-3, rtol=0)


def test_batch_order_and_batch_size_do_not_change_scores(clip, dino):
    generated, references = noise_images(7, seed=3), noise_images(4, seed=4, size=(32, 50))
    prompts = ["a dog", "a cat on a mat", "a red backpack", "a dog", "x", "a long " * 30, "a cat"]
    order = [6, 2, 0, 5, 1, 3, 4]
    permuted = [generated[i] for i in order]
    for score in (clip.clip_i, dino.dino):
        base = score(generated, references)
        torch.testing.assert_close(score(permuted, references), base[order], atol=1e-4, rtol=0)
        torch.testing.assert_close(score(generated, references[::-1]), base, atol=1e-4, rtol=0)
        for i in range(len(generated)):  # one image at a time, batch of one
            torch.testing.assert_close(score([generated[i]], references), base[i : i + 1], atol=1e-4, rtol=0)
    base_t = clip.clip_t(generated, prompts)
    torch.testing.assert_close(clip.clip_t(permuted, [prompts[i] for i in order]), base_t[order], atol=1e-4, rtol=0)
    single = tiny_clip_scorer(seed=0, batch_size=1)
    torch.testing.assert_close(single.clip_t(generated, prompts), base_t, atol=1e-4, rtol=0)


def test_scores_match_the_models_directly(clip, dino):
    images, references = noise_images(3, seed=5), noise_images(2, seed=6)
    pixels = clip.image_processor(images=images, return_tensors="pt")["pixel_values"]
    ref_pixels = clip.image_processor(images=references, return_tensors="pt")["pixel_values"]
    tokens = clip.tokenizer(["a dog"], padding=True, return_tensors="pt")
    with torch.no_grad():
        def pooled(out):
            return out if isinstance(out, torch.Tensor) else out.pooler_output

        image_features = pooled(clip.model.get_image_features(pixel_values=pixels))
        ref_features = pooled(clip.model.get_image_features(pixel_values=ref_pixels))
        text_features = pooled(clip.model.get_text_features(**tokens))
        dino_images = dino.model(pixel_values=dino.image_processor(images=images, return_tensors="pt")["pixel_values"])
        dino_refs = dino.model(pixel_values=dino.image_processor(images=references, return_tensors="pt")["pixel_values"])
    cos = torch.nn.functional.cosine_similarity
    expected_i = torch.stack([cos(f[None], ref_features).mean() for f in image_features]) * 100
    expected_t = cos(image_features, text_features) * 100
    cls, ref_cls = dino_images.last_hidden_state[:, 0], dino_refs.last_hidden_state[:, 0]
    expected_dino = torch.stack([cos(f[None], ref_cls).mean() for f in cls]) * 100
    torch.testing.assert_close(clip.clip_i(images, references), expected_i, atol=1e-4, rtol=0)
    torch.testing.assert_close(clip.clip_t(images, "a dog"), expected_t, atol=1e-4, rtol=0)
    torch.testing.assert_close(dino.dino(images, references), expected_dino, atol=1e-4, rtol=0)


def test_tiny_scorers_are_deterministic_and_leave_the_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = tiny_dino_scorer(seed=3), tiny_dino_scorer(seed=3), tiny_dino_scorer(seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    images = noise_images(2, seed=0)
    assert torch.equal(a.embed_images(images), b.embed_images(images))
    assert not torch.equal(a.embed_images(images), c.embed_images(images))


def test_from_pretrained_loads_a_local_folder(tmp_path):
    from mosaic_kit.eval import CLIPScorer, DINOScorer

    clip, dino = tiny_clip_scorer(seed=2), tiny_dino_scorer(seed=2)
    for name, scorer, parts in (("clip", clip, (clip.model, clip.image_processor, clip.tokenizer)),
                                ("dino", dino, (dino.model, dino.image_processor))):
        for part in parts:
            part.save_pretrained(tmp_path / name)
    images = noise_images(2, seed=1)
    loaded_clip = CLIPScorer.from_pretrained(str(tmp_path / "clip"), batch_size=1)
    loaded_dino = DINOScorer.from_pretrained(str(tmp_path / "dino"))
    torch.testing.assert_close(loaded_clip.embed_images(images), clip.embed_images(images), atol=1e-5, rtol=0)
    torch.testing.assert_close(loaded_clip.embed_texts(["a dog"]), clip.embed_texts(["a dog"]), atol=1e-5, rtol=0)
    torch.testing.assert_close(loaded_dino.embed_images(images), dino.embed_images(images), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="name_or_path"):
        CLIPScorer.from_pretrained("")


def test_similarity_helpers():
    a = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(similarity_matrix(a, b), torch.tensor([[100.0, 70.7107], [0.0, 70.7107]]))
    torch.testing.assert_close(mean_similarity(a, b), torch.tensor([85.35535, 35.35535]))
    with pytest.raises(ValueError, match="same width"):
        similarity_matrix(a, torch.ones(2, 3))
    with pytest.raises(ValueError, match="`a`"):
        similarity_matrix(torch.ones(3), b)


def test_bad_inputs_raise(clip, dino):
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="`images`.*single PIL image"):
        dino.embed_images(image)
    with pytest.raises(ValueError, match="non-empty list"):
        dino.embed_images([])
    with pytest.raises(ValueError, match=r"`images\[1\]`"):
        dino.embed_images([image, "not an image"])
    with pytest.raises(ValueError, match="`texts`"):
        clip.clip_t([image, image], ["only one"])
    with pytest.raises(ValueError, match="`texts`"):
        clip.embed_texts("a string")
    with pytest.raises(ValueError, match="batch_size"):
        tiny_dino_scorer(batch_size=0)
    with pytest.raises(ValueError, match="seed"):
        tiny_clip_scorer(seed=-1)
    with pytest.raises(ValueError, match="CLIPModel"):
        type(clip)(dino.model, clip.image_processor, clip.tokenizer)


# -- multi-subject crops ----------------------------------------------------------------------------
def colour_histogram(images: list[Image.Image]) -> torch.Tensor:
    """A deterministic, metric-agnostic embedder: 4×4×4 RGB histogram of each image."""
    rows = []
    for image in images:
        data = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
        pixels = data.view(-1, 3).long() // 64  # (N, 3) in 0..3
        bins = pixels[:, 0] * 16 + pixels[:, 1] * 4 + pixels[:, 2]
        rows.append(torch.bincount(bins, minlength=64).float())
    return torch.stack(rows)


def palette_pattern(palette: list[tuple[int, int, int]], seed: int, size: int = 32) -> Image.Image:
    """Random 4×4-pixel blocks drawn from a palette (a 'subject' with a colour identity)."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size))
    for y, x in itertools.product(range(0, size, 4), range(0, size, 4)):
        image.paste(rng.choice(palette), (x, y, x + 4, y + 4))
    return image


REDS = [(230, 30, 30), (200, 90, 20), (250, 140, 120)]
BLUES = [(20, 40, 220), (40, 160, 230), (110, 110, 250)]


@pytest.mark.parametrize("swap", [False, True])
def test_crop_score_finds_each_subject_in_a_composite(swap):
    red_refs = [palette_pattern(REDS, seed) for seed in range(3)]
    blue_refs = [palette_pattern(BLUES, seed) for seed in range(3, 6)]
    grey = Image.new("RGB", (128, 64), (128, 128, 128))
    left, right = (palette_pattern(BLUES, 10, 48), palette_pattern(REDS, 11, 48)) if swap else (
        palette_pattern(REDS, 10, 48), palette_pattern(BLUES, 11, 48))
    grey.paste(left, (8, 8))
    grey.paste(right, (72, 8))
    scores = subject_similarity(colour_histogram, [grey], [red_refs, blue_refs], sizes=(0.5, 0.75, 1.0), stride=0.25)
    red_box, blue_box = scores.best_box[0].tolist()  # per subject, in the order of `references`
    red_side_left = not swap
    red_centre = (red_box[0] + red_box[2]) / 2
    blue_centre = (blue_box[0] + blue_box[2]) / 2
    assert (red_centre < 64) == red_side_left and (blue_centre < 64) == (not red_side_left)
    assert red_box[2] <= 72 if red_side_left else red_box[0] >= 56  # the crop stays on its subject's half
    assert blue_box[0] >= 56 if red_side_left else blue_box[2] <= 72
    # the best crop is closer to each subject than the whole image, which mixes both
    assert bool((scores.crop > scores.whole + 5).all())


def test_subject_similarity_equals_a_brute_force_loop():
    images = noise_images(2, seed=8, size=(48, 32)) + [palette_pattern(REDS, 3, 40)]
    references = [noise_images(2, seed=9), [palette_pattern(REDS, 4), palette_pattern(BLUES, 5)], [palette_pattern(BLUES, 6)]]
    sizes, stride = (0.5, 0.75, 1.0), 0.5
    scores = subject_similarity(colour_histogram, images, references, sizes=sizes, stride=stride)
    assert scores.whole.shape == scores.crop.shape == (3, 3) and scores.best_box.shape == (3, 3, 4)
    cos = torch.nn.functional.cosine_similarity
    for i, image in enumerate(images):
        boxes = sliding_crops(image.width, image.height, sizes, stride)
        for s, refs in enumerate(references):
            def score(picture, refs=refs):
                embedding = colour_histogram([picture])[0]
                return sum(cos(embedding, colour_histogram([ref])[0], dim=0).item() for ref in refs) * 100 / len(refs)

            per_crop = [score(image.crop(box)) for box in boxes]
            best = max(range(len(boxes)), key=lambda c: (per_crop[c], -c))  # first maximum
            assert scores.whole[i, s].item() == pytest.approx(score(image), abs=1e-3)
            assert scores.crop[i, s].item() == pytest.approx(per_crop[best], abs=1e-3)
            assert tuple(scores.best_box[i, s].tolist()) == boxes[best]


def test_subject_similarity_with_a_model_ignores_batching():
    images = noise_images(2, seed=8, size=(48, 32))
    references = [noise_images(2, seed=9), noise_images(1, seed=10)]
    big, small = tiny_dino_scorer(seed=1, batch_size=64), tiny_dino_scorer(seed=1, batch_size=3)
    scores = subject_similarity(big.embed_images, images, references, sizes=(0.5, 1.0))
    again = subject_similarity(small.embed_images, images[::-1], [small.embed_images(r) for r in references], sizes=(0.5, 1.0))
    torch.testing.assert_close(again.crop, scores.crop.flip(0), atol=1e-4, rtol=0)
    torch.testing.assert_close(again.whole, scores.whole.flip(0), atol=1e-4, rtol=0)
    assert torch.equal(again.best_box, scores.best_box.flip(0))


@pytest.mark.parametrize("width,height", [(1, 1), (64, 32), (37, 53), (512, 512)])
@pytest.mark.parametrize("sizes,stride", [((0.5, 0.75, 1.0), 0.5), ((0.3,), 0.33), ((1.0,), 1.0)])
def test_sliding_crops_are_square_in_bounds_and_cover_the_image(width, height, sizes, stride):
    boxes = sliding_crops(width, height, sizes, stride)
    assert len(boxes) == len(set(boxes))
    covered = torch.zeros(height, width, dtype=torch.bool)
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        assert right - left == bottom - top
        covered[top:bottom, left:right] = True
    assert bool(covered.all())
    smallest = max(1, round(min(sizes) * min(width, height)))
    assert all(right - left >= smallest for left, _, right, _ in boxes)


def test_crop_inputs_are_validated():
    with pytest.raises(ValueError, match="stride"):
        sliding_crops(10, 10, stride=0)
    with pytest.raises(ValueError, match=r"sizes\[1\]"):
        sliding_crops(10, 10, sizes=(0.5, 1.5))
    with pytest.raises(ValueError, match="sizes"):
        sliding_crops(10, 10, sizes=())
    with pytest.raises(ValueError, match="width"):
        sliding_crops(0, 10)
    image = Image.new("RGB", (16, 16))
    with pytest.raises(ValueError, match="embed"):
        subject_similarity(lambda images: torch.ones(1, 3), [image], [[image]])
    with pytest.raises(ValueError, match="references"):
        subject_similarity(colour_histogram, [image], [])
    with pytest.raises(ValueError, match=r"references\[0\]"):
        subject_similarity(colour_histogram, [image], [torch.ones(0, 64)])


# -- attention hit rate -----------------------------------------------------------------------------
def brute_force_hits(attention, corr, cols, radius):
    """One Python loop per annotated point: the definition, spelled out."""
    hits, total = 0, 0
    offsets = corr.ref_offsets
    for b, k, p in itertools.product(range(corr.batch_size), range(corr.num_refs), range(corr.max_points)):
        if not corr.point_mask[b, k, p]:
            continue
        u, v = int(corr.ref_index[b, k, p]), int(corr.tgt_index[b, k, p])
        row = attention[b, offsets[k] + u] if attention.ndim == 3 else attention[b, k, p]
        best = max(range(row.numel()), key=lambda t: (float(row[t]), -t))  # first maximum
        distance = max(abs(best // cols - v // cols), abs(best % cols - v % cols))
        hits += distance <= radius
        total += 1
    return hits, total


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("radius", [0, 1, 2])
def test_hit_rate_matches_a_brute_force_loop(seed, radius):
    rows, cols = 3, 4
    corr = random_corr(seed, batch=3, num_refs=3, tgt_tokens=rows * cols)
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(corr.batch_size, corr.total_ref_tokens, corr.tgt_tokens, generator=g)
    hits, total = brute_force_hits(dense, corr, cols, radius)
    rate = attention_hit_rate(dense, corr, (rows, cols), radius=radius)
    assert rate.item() == pytest.approx(hits / total)
    per_point = attention_hit_rate(dense, corr, (rows, cols), radius=radius, reduction="none")
    assert per_point.shape == corr.point_mask.shape and int(per_point.sum()) == hits
    assert not bool((per_point & ~corr.point_mask).any())
    # the per-point form: rows gathered per pair, garbage at padded points
    gathered = dense.gather(
        1, torch.where(corr.point_mask, corr.global_rows, 0).reshape(corr.batch_size, -1, 1).expand(-1, -1, corr.tgt_tokens)
    ).reshape(*corr.point_mask.shape, corr.tgt_tokens)
    gathered = torch.where(corr.point_mask[..., None], gathered, torch.rand(gathered.shape, generator=g))
    assert brute_force_hits(gathered, corr, cols, radius) == (hits, total)
    assert attention_hit_rate(gathered, corr, (rows, cols), radius=radius).item() == pytest.approx(hits / total)
    # log-probabilities give the same argmax
    assert attention_hit_rate(dense.log(), corr, (rows, cols), radius=radius).item() == pytest.approx(hits / total)


def test_hit_rate_on_dense_attention_from_queries_and_keys():
    grid = TokenGrid(64, 48)  # 4 × 3 tokens
    corr = random_corr(7, batch=2, num_refs=2, tgt_tokens=grid.num_tokens)
    g = torch.Generator().manual_seed(0)
    queries = [torch.randn(2, 2, corr.total_ref_tokens, 8, generator=g) for _ in range(2)]
    keys = [torch.randn(2, 2, corr.tgt_tokens, 8, generator=g) for _ in range(2)]
    dense = dense_ref_target_attention(queries, keys)
    hits, total = brute_force_hits(dense, corr, grid.cols, 1)
    assert attention_hit_rate(dense, corr, grid).item() == pytest.approx(hits / total)
    # attention peaked exactly on every annotated target token: all hit at radius 0
    peaked = torch.zeros_like(dense)
    for b, k, p in corr.point_mask.nonzero().tolist():
        peaked[b, corr.global_rows[b, k, p], corr.tgt_index[b, k, p]] = 1.0
    assert attention_hit_rate(peaked, corr, grid, radius=0).item() == 1.0


def test_hit_rate_without_points_is_nan_and_bad_inputs_raise():
    from mosaic_kit.correspondence import Correspondences

    empty = Correspondences.from_dicts([[{}]], ref_tokens=[2], tgt_tokens=4)
    assert torch.isnan(attention_hit_rate(torch.rand(1, 2, 4), empty, (2, 2)))
    corr = Correspondences.from_dicts([[{0: 1}]], ref_tokens=[2], tgt_tokens=4)
    with pytest.raises(ValueError, match="tgt_grid"):
        attention_hit_rate(torch.rand(1, 2, 4), corr, (3, 2))
    with pytest.raises(ValueError, match="radius"):
        attention_hit_rate(torch.rand(1, 2, 4), corr, (2, 2), radius=-1)
    with pytest.raises(ValueError, match="reduction"):
        attention_hit_rate(torch.rand(1, 2, 4), corr, (2, 2), reduction="sum")
    with pytest.raises(ValueError, match="attention"):
        attention_hit_rate(torch.rand(1, 3, 4), corr, (2, 2))
    with pytest.raises(ValueError, match="attention"):
        attention_hit_rate(torch.ones(1, 2, 4, dtype=torch.long), corr, (2, 2))


# -- contact sheets ---------------------------------------------------------------------------------
def test_contact_sheet_places_thumbnails():
    red, blue = Image.new("RGB", (40, 20), "red"), Image.new("RGB", (10, 10), "blue")
    sheet = contact_sheet([SheetRow("", [red], [blue, blue])], thumb_size=32)
    assert sheet.size[0] >= 3 * 32 and sheet.size[1] >= 32
    colours = {c for _, c in sheet.getcolors(maxcolors=1 << 16)}
    assert (255, 0, 0) in colours and (0, 0, 255) in colours
    with pytest.raises(ValueError, match="rows"):
        contact_sheet([])
    with pytest.raises(ValueError, match="thumb_size"):
        contact_sheet([SheetRow("x")], thumb_size=2)


def test_hit_rate_on_point_attention_rows():
    from mosaic_kit.attention import PointAttentionRows

    grid = TokenGrid(48, 64)  # 3 × 4 tokens
    corr = random_corr(11, batch=2, num_refs=3, tgt_tokens=grid.num_tokens)
    g = torch.Generator().manual_seed(1)
    rows = PointAttentionRows(corr)
    queries = [torch.randn(2, 2, corr.total_ref_tokens, 8, generator=g) for _ in range(2)]
    keys = [torch.randn(2, 2, corr.tgt_tokens, 8, generator=g) for _ in range(2)]
    for query, key in zip(queries, keys):
        rows.add(query, key)
    dense = dense_ref_target_attention(queries, keys)
    for radius in (0, 1):
        expected = attention_hit_rate(dense, corr, grid, radius=radius, reduction="none")
        assert torch.equal(attention_hit_rate(rows.result(), corr, grid, radius=radius, reduction="none"), expected)
