"""The data-building stages one by one (mosaic_kit.dataset_builder), with tiny random models."""

from __future__ import annotations

import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFilter

from mosaic_kit.correspondence import TokenGrid
from mosaic_kit.dataset_builder import (
    DetectedSubjects,
    FilterThresholds,
    ImagesFromFolder,
    InstructionRewriter,
    PhotoComposites,
    PromptRecord,
    PromptTemplates,
    SharpnessScore,
    SubjectsFromFiles,
    box_iou,
    box_mask,
    cutout,
    decide,
    in_shard,
    item_seed,
    nms,
    prompts_from_file,
    subject_pairs,
    subject_scores,
    subjects_mentioned,
    tensor_to_pil,
    tiny_instruction_model,
)
from mosaic_kit.features import DenseSIFT

CATEGORIES = {"animal": ["dog", "cat", "owl"], "object": ["teapot", "clock"], "toy": ["robot", "duck toy"],
              "food": ["apple", "cake"]}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


def textured(seed: int, size: int = 64) -> torch.Tensor:
    """A smooth random colour texture, (3, size, size) in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, size // 8, size // 8, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0].clamp(0, 1)


# -- records ---------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(st.lists(st.text(alphabet="abcxyz0129_-", min_size=1, max_size=8), min_size=1, max_size=30, unique=True),
       st.integers(1, 7))
def test_shards_partition_every_item(ids, num_shards):
    owners = [[s for s in range(num_shards) if in_shard(i, s, num_shards)] for i in ids]
    assert all(len(o) == 1 for o in owners)


def test_shard_and_seed_arguments_are_checked():
    with pytest.raises(ValueError, match="shard"):
        in_shard("a", 3, 3)
    with pytest.raises(ValueError, match="num_shards"):
        in_shard("a", 0, 0)
    assert item_seed(0, "a") != item_seed(0, "b")


# -- prompts ---------------------------------------------------------------------------------------
def test_templates_are_deterministic_unique_and_list_their_subjects():
    sampler = PromptTemplates(CATEGORIES, scenes=["on a beach", "in a kitchen"], styles=["a photo", "a painting"],
                              interactions=["together", "side by side"], min_subjects=2, max_subjects=4)
    records = sampler.sample(40, seed=3)
    assert [r.to_dict() for r in records] == [r.to_dict() for r in sampler.sample(40, seed=3)]
    assert [r.prompt for r in records] != [r.prompt for r in sampler.sample(40, seed=4)]
    assert len({r.prompt for r in records}) == 40
    assert [r.prompt for r in sampler.sample(10, seed=3)] == [r.prompt for r in records[:10]]  # prefix-stable
    for record in records:
        assert 2 <= len(record.subjects) <= 4
        categories = record.slots["categories"]
        assert len(set(categories)) == len(categories)  # distinct categories
        assert all(s in CATEGORIES[c] for s, c in zip(record.subjects, categories))
        assert not subjects_mentioned(record.prompt, record.subjects)


def test_templates_refuse_impossible_requests():
    sampler = PromptTemplates({"a": ["dog"], "b": ["cat"]}, max_tries=200)
    assert len(sampler.sample(4, seed=0)) == 4
    with pytest.raises(ValueError, match="distinct prompts"):
        sampler.sample(5, seed=0)  # 2 subject orders × 2 templates: 4 distinct prompts
    with pytest.raises(ValueError, match="max_subjects"):
        PromptTemplates({"a": ["dog"]}, max_subjects=2)
    with pytest.raises(ValueError, match="categories"):
        PromptTemplates({"a": []})
    with pytest.raises(ValueError, match=r"\{subjects\}"):
        PromptTemplates(CATEGORIES, templates=["no slot"])


def test_prompts_from_file_json_and_jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "x1", "prompt": "a dog and a cat", "subjects": ["dog", "cat"]}) + "\n\n"
                    + json.dumps({"prompt": "a {dog2} and a {dog6}", "subjects": ["dog2", "dog6"]}) + "\n")
    first, second = prompts_from_file(path, names={"dog2": "dog", "dog6": "dog"})
    assert (first.id, first.subjects, first.identities) == ("x1", ["dog", "cat"], None)
    assert (second.id, second.prompt, second.subjects, second.identities) == ("p000001", "a dog and a dog", ["dog", "dog"],
                                                                            ["dog2", "dog6"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "a dog"}]))
    with pytest.raises(ValueError, match="entry 0"):
        prompts_from_file(bad)
    with pytest.raises(ValueError, match="not a file"):
        prompts_from_file(tmp_path / "missing.json")
    bad.write_text(json.dumps([{"id": "a", "prompt": "x", "subjects": ["x"]}] * 2))
    with pytest.raises(ValueError, match="unique"):
        prompts_from_file(bad)


def test_prompts_file_that_is_not_utf8_names_the_file_and_the_byte(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({"prompt": "a dog", "subjects": ["dog"]}).encode() + b"\n"
                     + '{"prompt": "a caf\u00e9 dog", "subjects": ["dog"]}'.encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match=r"latin1\.jsonl: expected UTF-8 text, but byte 0xe9 at line 2, column 18"):
        prompts_from_file(path)
    with_bom = tmp_path / "bom.json"
    with_bom.write_bytes("\ufeff".encode() + json.dumps([{"prompt": "a caf\u00e9 dog", "subjects": ["dog"]}]).encode())
    record, = prompts_from_file(with_bom)
    assert record.prompt == "a caf\u00e9 dog"  # UTF-8 with a byte-order mark, as some editors write


def test_subjects_mentioned_counts_repeats():
    assert subjects_mentioned("a dog and a dog", ["dog", "dog"]) == []
    assert subjects_mentioned("a dog on grass", ["dog", "dog"]) == ["dog"]
    assert subjects_mentioned("Dogs and a Cat", ["dog", "dog", "cat"]) == []
    assert subjects_mentioned("a hotdog", ["dog"]) == ["dog"]  # whole words only


def test_rewriter_is_deterministic_and_falls_back_when_a_subject_is_lost():
    model, tokenizer = tiny_instruction_model(seed=0)
    rewriter = InstructionRewriter(model, tokenizer, max_new_tokens=6, temperature=1.0, seed=5)
    record = PromptRecord("p7", "a dog and a cat in a park", ["dog", "cat"])
    first, second = rewriter.rewrite(record), rewriter.rewrite(record)
    assert first == second and first  # seeded per item
    assert rewriter.rewrite(PromptRecord("p8", record.prompt, record.subjects)) != first
    out = rewriter(record)  # a random model's gibberish drops the subjects: the template's prompt stays
    assert (out.prompt, out.rewritten) == (record.prompt, False)
    assert out.provenance["rewrite"]["answer"] == first and "missing" in out.provenance["rewrite"]["rejected"]
    kept = rewriter.apply(record, "A dog chases a cat through a sunny park.")
    assert kept.rewritten and kept.prompt.startswith("A dog") and kept.slots["template_prompt"] == record.prompt
    assert not rewriter.apply(record, "A cat alone.").rewritten
    assert not rewriter.apply(record, "").rewritten
    with pytest.raises(ValueError, match="model"):
        InstructionRewriter(object(), tokenizer)


# -- images ----------------------------------------------------------------------------------------
def test_diffusers_generator_seeds_per_item_not_per_batch():
    from diffusers import FluxPipeline

    from mosaic_kit.dataset_builder import DiffusersImageGenerator
    from mosaic_kit.pipelines.tiny import tiny_flux_components

    pipe = FluxPipeline(**tiny_flux_components(seed=0))
    records = [PromptRecord(f"p{i}", f"a dog and cat number {i}", ["dog", "cat"]) for i in range(3)]
    make = lambda batch: DiffusersImageGenerator(pipe, height=32, width=48, num_inference_steps=2, batch_size=batch,  # noqa: E731
                                                 seed=1, extra={"max_sequence_length": 16})
    batched, single = make(3)(records), make(1)(records)
    assert [g.image.size for g in batched] == [(48, 32)] * 3
    assert [g.seed for g in batched] == [item_seed(1, r.id) for r in records]
    for a, b in zip(batched, single):  # the same image whatever the batch (up to float noise of batching)
        diff = (torch.tensor(list(a.image.get_flattened_data())) - torch.tensor(list(b.image.get_flattened_data()))).abs().max()
        assert diff <= 2
    again = make(3)(records)
    assert all(list(a.image.get_flattened_data()) == list(b.image.get_flattened_data()) for a, b in zip(batched, again))
    with pytest.raises(ValueError, match="height"):
        DiffusersImageGenerator(pipe, height=0)


def test_images_from_folder(tmp_path):
    Image.new("RGB", (20, 10), "red").save(tmp_path / "a.jpg")
    image, = ImagesFromFolder(tmp_path)([PromptRecord("a", "a dog", ["dog"])])
    assert image.image.size == (20, 10) and image.seed is None
    with pytest.raises(FileNotFoundError, match="'b'"):
        ImagesFromFolder(tmp_path)([PromptRecord("b", "a dog", ["dog"])])
    with pytest.raises(ValueError, match="folder"):
        ImagesFromFolder(tmp_path / "none")


def test_images_from_folder_records_a_decompression_bomb_as_an_error_naming_the_file(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "bomb.png")
    Image.new("RGB", (40, 40), "red").save(tmp_path / "fine.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # 64² > 2 × 1500: PIL refuses it; 40² only warns
    with pytest.raises(ValueError, match=r"bomb\.png: expected at most"):
        ImagesFromFolder(tmp_path)([PromptRecord("bomb", "a dog", ["dog"])])
    image, = ImagesFromFolder(tmp_path)([PromptRecord("fine", "a dog", ["dog"])])
    assert image.image.size == (40, 40)


@pytest.fixture
def photo_root(tmp_path):
    root = tmp_path / "photos"
    for i, name in enumerate(["dog", "cat", "teapot", "clock"]):
        (root / name).mkdir(parents=True)
        for j in range(2):
            tensor_to_pil(textured(10 * i + j, 64)).resize((64, 48)).save(root / name / f"{j:02d}.jpg")
    return root


def test_photo_composites_masks_are_exact_and_seeded(photo_root):
    record = PromptRecord("p0", "a dog, a cat and a teapot", ["dog", "cat", "teapot"])
    composites = PhotoComposites(photo_root, canvas_size=128, scale_range=(0.3, 0.4), seed=2)
    first, = composites([record])
    again, = composites([record])
    assert list(first.image.get_flattened_data()) == list(again.image.get_flattened_data())
    masks = torch.stack(first.subject_masks)
    assert masks.shape == (3, 128, 128) and bool((masks.sum(0) <= 1).all()) and all(bool(m.any()) for m in masks)
    assert [len(v) for v in first.other_views] == [1, 1, 1]
    assert all(view not in first.provenance["photos"] for views in first.other_views for view in views)
    with pytest.raises(ValueError, match="identity 'owl'"):
        composites([PromptRecord("p1", "an owl", ["owl"])])


def test_photo_composites_refuse_a_decompression_bomb_naming_the_photo(photo_root, monkeypatch):
    for path in (photo_root / "dog").glob("*.jpg"):
        Image.new("RGB", (200, 200)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 48)  # the other photos (64×48) stay below it
    composites = PhotoComposites(photo_root, canvas_size=128, scale_range=(0.3, 0.4))
    with pytest.raises(ValueError, match=r"dog/0[01]\.jpg: expected at most"):
        composites([PromptRecord("p0", "a dog and a cat", ["dog", "cat"])])
    image, = composites([PromptRecord("p1", "a teapot and a cat", ["teapot", "cat"])])
    assert image.image.size == (128, 128)


# -- subjects --------------------------------------------------------------------------------------
def test_box_iou_matches_a_loop():
    generator = torch.Generator().manual_seed(0)
    low = torch.rand(7, 2, generator=generator) * 10
    boxes = torch.cat([low, low + torch.rand(7, 2, generator=generator) * 10 + 0.1], 1)
    fast = box_iou(boxes, boxes[:4])
    for i in range(7):
        for j in range(4):
            a, b = boxes[i].tolist(), boxes[j].tolist()
            w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
            h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
            union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
            assert abs(float(fast[i, j]) - w * h / union) < 1e-5


def test_nms_keeps_the_best_of_each_overlapping_group():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [21, 20, 30, 30], [50, 50, 51, 51.]])
    scores = torch.tensor([0.5, 0.9, 0.3, 0.8, 0.1])
    assert nms(boxes, scores, 0.5).tolist() == [1, 3, 4]
    assert nms(boxes, scores, 1.0).tolist() == [1, 3, 0, 2, 4]


def test_grounding_dino_sam_tiny_shapes_and_counts():
    from mosaic_kit.dataset_builder import GroundingDinoSam, tiny_grounding_dino, tiny_sam

    detector, processor = tiny_grounding_dino(seed=0)
    sam, sam_processor = tiny_sam(seed=0)
    image = tensor_to_pil(textured(1, 64)).resize((80, 64))
    finder = GroundingDinoSam(detector, processor, sam, sam_processor, box_threshold=0.0, text_threshold=0.0)
    found = finder(image, ["dog", "cat", "dog"])
    again = finder(image, ["dog", "cat", "dog"])
    assert found.boxes == again.boxes and found.scores == again.scores
    assert set(found.counts) == {"dog", "cat"}
    for name, box, score, mask in zip(found.names, found.boxes, found.scores, found.masks):
        assert box is not None and mask.shape == (64, 80) and mask.dtype == torch.bool
        assert 0 <= box[0] <= box[2] <= 80.001 and 0 <= box[1] <= box[3] <= 64.001
    dog_scores = [s for n, s in zip(found.names, found.scores) if n == "dog"]
    assert dog_scores == sorted(dog_scores, reverse=True)  # listed dogs get the best boxes in order
    strict = GroundingDinoSam(detector, processor, box_threshold=1.0)(image, ["dog"])
    assert strict.counts == {"dog": 0} and strict.boxes == [None] and strict.masks == [None]
    with pytest.raises(ValueError, match="box_threshold"):
        GroundingDinoSam(detector, processor, box_threshold=1.5)
    with pytest.raises(ValueError, match="segmenter"):
        GroundingDinoSam(detector, processor, sam, None)


def test_subjects_from_files(tmp_path):
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[2:6, 3:9] = True
    Image.fromarray((mask.to(torch.uint8) * 255).numpy()).save(tmp_path / "m.png")
    (tmp_path / "a.json").write_text(json.dumps({"subjects": [
        {"name": "dog", "box": [3, 2, 9, 6], "mask": "m.png"}, {"name": "dog", "box": [10, 10, 16, 16], "score": 0.5},
        {"name": "cat", "box": [0, 10, 4, 16], "score": 0.9}]}))
    found = SubjectsFromFiles(tmp_path)("a", Image.new("RGB", (32, 32)), ["dog", "cat"])
    assert found.counts == {"dog": 2, "cat": 1}
    assert found.masks[0].shape == (32, 32) and int(found.masks[0].sum()) == 4 * int(mask.sum())
    assert found.mask_scores == [1.0, 0.0] and torch.equal(found.masks[1], box_mask([0, 10, 4, 16], 32, 32))
    (tmp_path / "b.json").write_text(json.dumps({"subjects": [{"name": "dog", "box": [5, 5, 2, 9]}]}))
    with pytest.raises(ValueError, match="x1 > x0"):
        SubjectsFromFiles(tmp_path)("b", Image.new("RGB", (32, 32)), ["dog"])
    with pytest.raises(ValueError, match="box file"):
        SubjectsFromFiles(tmp_path)("c", Image.new("RGB", (32, 32)), ["dog"])


# -- filter ----------------------------------------------------------------------------------------
def _scores(**changes):
    scores = {"clip": 30.0, "quality": 50.0, "counts": {"dog": 1, "cat": 1}, "listed": {"dog": 1, "cat": 1},
              "mask_scores": [0.95, 0.9], "areas": [0.2, 0.1], "max_box_iou": 0.0}
    scores.update(changes)
    return scores


ALL = FilterThresholds(min_clip=25, min_quality=20, exactly_once=True, min_mask_score=0.8, min_subject_area=0.05,
                       max_subject_area=0.5, max_box_iou=0.1)


@pytest.mark.parametrize("changes, key", [
    ({}, None),
    ({"clip": 24.9}, "low_clip"),
    ({"quality": 19.0}, "low_quality"),
    ({"counts": {"dog": 1}}, "subject_missing"),
    ({"counts": {"dog": 1, "cat": 2}}, "subject_repeated"),
    ({"counts": {"dog": 1, "cat": 1}, "listed": {"dog": 2, "cat": 1}}, "subject_missing"),
    ({"mask_scores": [0.95, 0.5]}, "low_mask_score"),
    ({"areas": [0.2, 0.01]}, "subject_too_small"),
    ({"areas": [0.6, 0.1]}, "subject_too_large"),
    ({"max_box_iou": 0.3}, "subjects_overlap"),
])
def test_filter_decides_each_criterion(changes, key):
    kept, reasons = decide(_scores(**changes), ALL)
    assert kept == (key is None)
    assert [r.split(":")[0] for r in reasons] == ([] if key is None else [key])
    assert decide(_scores(**changes), FilterThresholds(exactly_once=False)) == (True, [])  # all off


def test_filter_keeps_every_failed_reason_and_checks_its_inputs():
    kept, reasons = decide(_scores(clip=1.0, areas=[0.0, 0.9]), ALL)
    assert not kept and [r.split(":")[0] for r in reasons] == ["low_clip", "subject_too_small", "subject_too_large"]
    with pytest.raises(ValueError, match="'clip'"):
        decide({k: v for k, v in _scores().items() if k != "clip"}, ALL)
    with pytest.raises(ValueError, match="max_box_iou"):
        FilterThresholds(max_box_iou=2.0)


def test_the_filter_stage_config_is_the_thresholds_plus_its_scorers():
    from mosaic_kit.dataset_builder import FilterStageConfig

    config = FilterStageConfig(clip="openai/clip-vit-base-patch32", min_clip=20.0, max_box_iou=0.4)
    assert config.thresholds == FilterThresholds(min_clip=20.0, max_box_iou=0.4)
    assert type(config.thresholds) is FilterThresholds  # what the provenance records: thresholds only
    with pytest.raises(ValueError, match="max_box_iou"):  # the thresholds' own checks apply to the config
        FilterStageConfig(max_box_iou=2.0)
    with pytest.raises(ValueError, match="filter.clip"):
        FilterStageConfig(min_clip=20.0)


def test_subject_scores_from_detections():
    masks = [box_mask([0, 0, 8, 8], 16, 16), box_mask([4, 4, 12, 12], 16, 16)]
    found = DetectedSubjects(["dog", "dog"], [[0, 0, 8, 8], [4, 4, 12, 12]], [0.9, 0.8], masks, [0.9, 0.8], {"dog": 3})
    scores = subject_scores(found, (16, 16))
    assert scores["listed"] == {"dog": 2} and scores["areas"] == [0.25, 0.25]
    assert abs(scores["max_box_iou"] - 16 / 112) < 1e-6
    assert decide(scores, FilterThresholds())[1] == ["subject_repeated: dog found 3 times, listed 2"]


def test_sharpness_ranks_blurred_images_lower():
    image = tensor_to_pil(torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)))
    score = SharpnessScore(size=64)
    values = score([image, image.filter(ImageFilter.GaussianBlur(1)), image.filter(ImageFilter.GaussianBlur(3))])
    assert values[0] > values[1] > values[2] > 0


def test_clip_scores_run_with_a_tiny_clip():
    from mosaic_kit.dataset_builder import ClipQualityScore
    from mosaic_kit.eval import tiny_clip_scorer

    values = ClipQualityScore(tiny_clip_scorer())([Image.new("RGB", (32, 32), "red"), Image.new("RGB", (40, 32))])
    assert len(values) == 2 and all(0 <= v <= 1 for v in values)


# -- references ------------------------------------------------------------------------------------
def test_cutout_keeps_only_the_subject():
    image = tensor_to_pil(textured(3, 64))
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[10:30, 20:50] = True
    mask[10:14, 20:24] = False
    reference, ref_mask = cutout(image, mask, size=30, margin=0.0, background=0.0)
    pixels = torch.tensor(list(reference.get_flattened_data())).view(30, 30, 3)
    assert reference.size == (30, 30) and ref_mask.shape == (30, 30)
    assert int(ref_mask.sum()) < 30 * 20 + 1 and bool(ref_mask[15, 15])
    assert bool((pixels[~ref_mask] <= 40).all())  # background (bicubic may bleed a little)
    assert not bool(ref_mask[:5].any())  # the square pads above and below the 30 × 20 box
    with pytest.raises(ValueError, match="non-empty"):
        cutout(image, torch.zeros(64, 64, dtype=torch.bool), 16)
    with pytest.raises(ValueError, match="shape"):
        cutout(image, torch.ones(8, 8, dtype=torch.bool), 16)


def test_editor_tiny_kontext_is_seeded():
    from diffusers import FluxKontextPipeline

    from mosaic_kit.dataset_builder import DiffusersEditor
    from mosaic_kit.pipelines.tiny import tiny_flux_components

    editor = DiffusersEditor(FluxKontextPipeline(**tiny_flux_components(seed=1)), size=32, num_inference_steps=2,
                             extra={"max_sequence_length": 16, "_auto_resize": False})
    source = tensor_to_pil(textured(0, 32))
    view, info = editor(source, "dog", "p0/0")
    again, _ = editor(source, "dog", "p0/0")
    other, _ = editor(source, "dog", "p0/1")
    assert view.size == (32, 32) and info["prompt"].startswith("Show the same dog")
    assert list(view.get_flattened_data()) == list(again.get_flattened_data()) != list(other.get_flattened_data())


# -- correspondences -------------------------------------------------------------------------------
def test_pairs_lie_inside_their_masks_and_are_disjoint():
    target = textured(5, 128)
    rng = random.Random(0)
    for trial in range(3):
        masks = []
        for _ in range(3):
            mask = torch.zeros(128, 128, dtype=torch.bool)
            x, y = rng.randrange(0, 64), rng.randrange(0, 64)
            mask[y:y + rng.randrange(40, 64), x:x + rng.randrange(40, 64)] = True  # overlapping: eq. 2 matters
            masks.append(mask)
        refs = [textured(20 + trial * 3 + k, 64) for k in range(3)]
        ref_masks = [None, box_mask([8, 8, 56, 56], 64, 64), None]
        result = subject_pairs(target, masks, refs, ref_masks, [DenseSIFT(grid_size=32, patch_size=16)],
                               match_filter="none", disjoint=("drop", "confidence", "first")[trial])
        claimed = []
        for k, pairs in enumerate(result.pairs):
            assert pairs.shape[1] == 4 and pairs.shape[0] == int(result.corr.num_points[0, k])
            tx, ty = pairs[:, 2].long(), pairs[:, 3].long()
            assert bool(masks[k][ty, tx].all())
            if ref_masks[k] is not None:
                assert bool(ref_masks[k][pairs[:, 1].long(), pairs[:, 0].long()].all())
            claimed.append(set(TokenGrid(128, 128).pixel_to_token(pairs[:, 2:]).tolist()))
        assert sum(len(c) for c in claimed) == len(set().union(*claimed))  # eq. 2: no token claimed by two references
        assert sum(len(p) for p in result.pairs) > 0


def test_identical_reference_matches_itself():
    image = textured(9, 64)
    mask = torch.ones(64, 64, dtype=torch.bool)
    result = subject_pairs(image, [mask], [image], [None], [DenseSIFT(grid_size=16, patch_size=16)], match_filter="mutual")
    pairs = result.pairs[0]
    assert pairs.shape[0] >= 12 and torch.equal(pairs[:, :2], pairs[:, 2:])


def test_subject_pairs_checks_inputs():
    image = torch.rand(3, 32, 32)
    sift = [DenseSIFT(grid_size=8, patch_size=8)]
    with pytest.raises(ValueError, match="one target mask"):
        subject_pairs(image, [], [image], [None], sift)
    with pytest.raises(ValueError, match=r"target_masks\[0\]"):
        subject_pairs(image, [torch.ones(16, 16, dtype=torch.bool)], [image], [None], sift)
    with pytest.raises(ValueError, match="match_filter"):
        subject_pairs(image, [torch.ones(32, 32, dtype=torch.bool)], [image], [None], sift, match_filter="best")
    with pytest.raises(ValueError, match="extractor"):
        subject_pairs(image, [torch.ones(32, 32, dtype=torch.bool)], [image], [None], [])


def test_sam_segments_several_boxes_as_one_by_one():
    from mosaic_kit.dataset_builder import GroundingDinoSam, tiny_grounding_dino, tiny_sam

    finder = GroundingDinoSam(*tiny_grounding_dino(seed=0), *tiny_sam(seed=1))
    image = tensor_to_pil(textured(2, 64)).resize((64, 48))
    boxes = [[2.0, 3.0, 30.0, 40.0], [20.0, 10.0, 60.0, 44.0], [0.0, 0.0, 64.0, 48.0]]
    masks, scores = finder.segment_boxes(image, boxes)
    for box, mask, score in zip(boxes, masks, scores):
        single, single_score = finder.segment(image, box)
        assert torch.equal(single, mask) and abs(single_score - score) < 1e-5


def test_diffusers_generator_drives_a_tiny_sd3_pipeline():
    """Any diffusers text-to-image pipeline: a tiny StableDiffusion3Pipeline built in code."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from mosaic_kit.dataset_builder import DiffusersImageGenerator
    from mosaic_kit.pipelines.tiny import tiny_clip_tokenizer, tiny_t5_tokenizer

    tokenizer, tokenizer_3 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    clip_config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, projection_dim=16, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=32, d_ff=37, d_kv=8, num_layers=1, num_heads=4,
                                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                        pooled_projection_dim=32, out_channels=4, pos_embed_max_size=32)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, shift_factor=0.0609, scaling_factor=1.5035)
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae.eval(), transformer=transformer.eval(),
        text_encoder=CLIPTextModelWithProjection(clip_config).eval(), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(clip_config).eval(), tokenizer_2=tokenizer,
        text_encoder_3=t5.eval(), tokenizer_3=tokenizer_3,
    )
    generator = DiffusersImageGenerator(pipe, height=32, width=48, num_inference_steps=2, batch_size=2, seed=0,
                                        extra={"max_sequence_length": 16})
    records = [PromptRecord("p0", "a dog and a cat", ["dog", "cat"]), PromptRecord("p1", "a cat and a clock", ["cat", "clock"])]
    first, again = generator(records), generator(records)
    assert [g.image.size for g in first] == [(48, 32)] * 2
    assert [g.provenance["seed"] for g in first] == [item_seed(0, "p0"), item_seed(0, "p1")]
    assert all(a.image.tobytes() == b.image.tobytes() for a, b in zip(first, again))
