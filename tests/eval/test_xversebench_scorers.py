"""Every XVerseBench scorer and the judge on tiny random transformers models built in code: the
plumbing (inputs reach the model, outputs come back in the documented shapes and ranges), model
loading by folder, and the clear errors of the scorers whose published models are not in
transformers."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from PIL import Image, ImageDraw

pytest.importorskip("transformers")

from mosaic_kit.eval.judge import MLLMJudge
from mosaic_kit.eval.vlm import VisionLanguageModel, tiny_vision_language_model
from mosaic_kit.eval.xversebench import (
    AestheticPredictorV25,
    FacerRetinaFace,
    FaceIdentityScorer,
    ModelScopeVQA,
    SubjectSimilarityScorer,
    VLMQuestionAnswerer,
    tiny_aesthetic_model,
    tiny_face_models,
    tiny_subject_models,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vlm():
    return tiny_vision_language_model(seed=0)


@pytest.fixture(scope="module")
def subject_models():
    return tiny_subject_models(seed=0)


def scene() -> Image.Image:
    image = Image.new("RGB", (96, 64), (40, 120, 200))
    ImageDraw.Draw(image).ellipse((20, 10, 70, 55), fill=(230, 200, 30))
    return image


def test_vlm_answers_are_deterministic_text_and_the_model_reloads_from_a_folder(vlm, tmp_path):
    image = scene()
    first = vlm.generate([image, image], "Is there a dog?", max_new_tokens=4)
    assert isinstance(first, str) and first == vlm.generate([image, image], "Is there a dog?", max_new_tokens=4)
    vlm.model.save_pretrained(tmp_path)
    vlm.processor.save_pretrained(tmp_path)
    loaded = VisionLanguageModel.from_pretrained(str(tmp_path), dtype=torch.float32, max_new_tokens=4)
    assert loaded.generate([image, image], "Is there a dog?") == first
    with pytest.raises(ValueError, match="images"):
        vlm.generate([], "Is there a dog?")


def test_vqa_plumbing_one_answer_per_question(vlm):
    vqa = VLMQuestionAnswerer(vlm, max_new_tokens=2)
    answers = vqa.answer(scene(), ["Is there a sun?", "Is the sky blue?", "Is there a dog?"])
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    with pytest.raises(ValueError, match="question"):
        VLMQuestionAnswerer(vlm, template="no placeholder")


def test_judge_plumbing_on_a_tiny_vlm(vlm):
    verdict = MLLMJudge(vlm).judge("a yellow ball in the sky", [scene()], scene())
    assert set(verdict.answers) == {"prompt_following", "subject_consistency"}
    for value in (verdict.prompt_following, verdict.subject_consistency):
        assert value is None or 0 <= value <= 10


def test_face_scorer_plumbing_on_tiny_models():
    detector, embedder = tiny_face_models(seed=1)
    scorer = FaceIdentityScorer(detector, embedder)
    reference = scorer.embed_reference(scene())
    assert reference.shape == (16,)
    scores = scorer.score(scene().transpose(Image.Transpose.FLIP_LEFT_RIGHT), [reference, reference])
    assert len(scores) == 2 and scores[0] == scores[1] and -100 <= scores[0] <= 100


def test_grounding_segmentation_and_dino_plumbing(subject_models):
    grounder, segmenter, dino = subject_models
    image = scene()
    boxes = grounder.ground(image, "yellow ball")
    assert all(len(b) == 4 and 0 <= b[0] <= b[2] <= image.width and 0 <= b[1] <= b[3] <= image.height for b in boxes)
    masks = segmenter.segment(image, [(10, 5, 60, 50), (0, 0, 96, 64)])
    assert masks.shape == (2, 64, 96) and masks.dtype == torch.bool
    scorer = SubjectSimilarityScorer(grounder, segmenter, dino)
    reference = dino.embed_images([image])[0]
    score, instances = scorer.score(image, "yellow ball", reference)
    assert len(instances) <= 3 and all(i.width == i.height for i in instances)
    assert (score == 0.0) if not instances else -100 <= score <= 100
    # the DINO preprocessing is XVerse's: shorter side 256, centre crop 224
    assert dino.image_processor.size == {"shortest_edge": 256} and dino.image_processor.crop_size == {"height": 224, "width": 224}


def test_aesthetic_plumbing_on_a_tiny_siglip():
    model = tiny_aesthetic_model(seed=0)
    values = model.score([scene(), Image.new("RGB", (50, 50), "white")])
    assert values.shape == (2,) and values.dtype == torch.float32 and values[0] != values[1]


@pytest.mark.parametrize("build, package, message", [
    (lambda: ModelScopeVQA(), "modelscope", "pip install modelscope"),
    (lambda: FacerRetinaFace("cpu"), "facer", "pip install pyfacer"),
    (lambda: AestheticPredictorV25("cpu"), "aesthetic_predictor_v2_5", "pip install aesthetic-predictor-v2-5"),
])
def test_published_models_outside_transformers_name_what_to_install(build, package, message):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    with pytest.raises(ImportError, match=message):
        build()
