"""An OmniContext-style MLLM judge: prompt following and subject consistency on 0-10, overall
√(PF·SC), averaged per task type then across types (`MLLMJudge`, `judge_summary`).

The judge is a local transformers vision-language model by folder or hub id
(`mosaic_kit.eval.VisionLanguageModel`) or any object with ``generate(images, text) -> str``
(an API client); its prompts are text files (`PROMPTS_DIR`). See `docs/eval/judge.md`.
"""

from .judge import (
    JUDGE_ASPECTS,
    PROMPTS_DIR,
    JudgeBackend,
    JudgeScore,
    MLLMJudge,
    judge_summary,
    load_judge_prompt,
    parse_judge_score,
)

__all__ = [
    "JUDGE_ASPECTS",
    "PROMPTS_DIR",
    "JudgeBackend",
    "JudgeScore",
    "MLLMJudge",
    "judge_summary",
    "load_judge_prompt",
    "parse_judge_score",
]
