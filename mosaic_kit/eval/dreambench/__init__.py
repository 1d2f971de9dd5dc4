"""The DreamBench protocol, single- and multi-subject: cases, generation, scoring, reports.

The benchmark folder (`DreamBench.load`) holds one folder of photos per subject, `prompts.json`
(subjects with class noun and kind, 25 prompt templates per kind) and `pairs_multi.json`
(multi-subject cases). A case is one prompt with its subjects and a number of images:

- single-subject: subject × prompt, id `single/<subject>/<prompt index:02d>`;
- multi-subject: one entry of `pairs_multi.json`, id `multi/<pair index:02d>`.

Generated images live at `<images root>/<case id>/<image index:02d>.png` (scoring-only mode also
reads `.jpg`, `.jpeg` and `.webp`, in file-name order). Scores, all ×100:

- single: CLIP-I and DINO of each image against all photos of the subject (mean over photos),
  CLIP-T against the prompt; case score = mean over its images;
- multi: per subject, CLIP-I and DINO on the whole image and on the best sliding crop for that
  subject (`subject_similarity`), averaged over subjects; the crop score is the headline one;
  CLIP-T on the whole image against the whole prompt.

`evaluate_cases` runs the loop (resumable: a case whose JSON exists is not redone) and writes
the per-case JSON, `results.csv`, `results.json`, `summary.json`, `summary.md` (laid out like
the paper's Table 1) and contact sheets. See `docs/evaluation.md` and `recipes/evaluate.py`.

The package is split by job: ``benchmark`` (the folder), ``cases``, ``generation``, ``scoring``
and ``run`` (the loop and its files).
"""

from .benchmark import DREAMBENCH_ENV, IMAGE_SUFFIXES, SETTINGS, DreamBench, DreamBenchSubject
from .cases import EvalCase, find_case_images, list_cases
from .generation import GenerationSettings, generate_case_images, image_seed
from .run import check_run_settings, evaluate_cases
from .scoring import score_case, summarize, summary_markdown

__all__ = [
    "DREAMBENCH_ENV",
    "IMAGE_SUFFIXES",
    "SETTINGS",
    "DreamBench",
    "DreamBenchSubject",
    "EvalCase",
    "GenerationSettings",
    "check_run_settings",
    "evaluate_cases",
    "find_case_images",
    "generate_case_images",
    "image_seed",
    "list_cases",
    "score_case",
    "summarize",
    "summary_markdown",
]
