"""A tiny fake XVerseBench in the benchmark's own format (case files, DSG files, subject photos),
written in code for the tests; nothing of the real benchmark is used."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

SUBJECTS = {
    "human/00_boy.jpg": ("boy", (220, 180, 150)),
    "object/00_motorcycle.jpg": ("motorcycle", (30, 30, 200)),
    "animal/03_corgi.png": ("corgi", (200, 120, 40)),
}


def photo(colour: tuple[int, int, int], seed: int, size=(40, 32), alpha: bool = False) -> Image.Image:
    rng = random.Random(seed)
    image = Image.new("RGBA" if alpha else "RGB", size, (255, 255, 255, 0) if alpha else (255, 255, 255))
    for _ in range(12):
        x, y = rng.randrange(size[0] - 8), rng.randrange(size[1] - 8)
        tone = tuple(max(0, min(255, c + rng.randint(-30, 30))) for c in colour)
        image.paste(tone + ((255,) if alpha else ()), (x, y, x + 8, y + 8))
    return image


def entry(index: int, prompt: str, paths: list[str]) -> dict:
    return {
        "index": index, "input_images": [], "position_delta": [0, -32], "prompt": prompt,
        "modulation": [{
            "type": "adapter",
            "src_inputs": [{"image_path": f"assets/XVerseBench/{p}", "caption": f"a {SUBJECTS[p][0]}"} for p in paths],
            "use_words": [[slot, SUBJECTS[p][0], SUBJECTS[p][0]] for slot, p in enumerate(paths)],
        }],
    }


def dsg(prompt: str, questions: list[str], dependencies: list[list[int]]) -> dict:
    return {
        "prompt": prompt,
        "qid2tuple": {str(i + 1): "entity - whole" for i in range(len(questions))},
        "qid2dependency": {str(i + 1): deps for i, deps in enumerate(dependencies)},
        "qid2question": {str(i + 1): q for i, q in enumerate(questions)},
    }


def write_fake_xversebench(root: Path) -> Path:
    """2 single-subject cases (a human, an animal with an alpha channel) and 1 three-subject case."""
    for index, (relative, (_, colour)) in enumerate(SUBJECTS.items()):
        path = root / "assets" / "XVerseBench" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        photo(colour, index, alpha=path.suffix == ".png").save(path)
    tools = root / "eval" / "tools"
    tools.mkdir(parents=True)
    single = [entry(0, "a boy reading a book", ["human/00_boy.jpg"]),
              entry(1, "a corgi on the beach\n", ["animal/03_corgi.png"])]
    single_dsg = [dsg(single[0]["prompt"], ["Is there a boy?", "Is there a book?", "Is the boy reading the book?"],
                      [[0], [0], [1, 2]]),
                  dsg(single[1]["prompt"], ["Is there a corgi?", "Is the corgi on the beach?"], [[0], [1]])]
    multi = [entry(0, "a boy riding a motorcycle with a corgi",
                   ["human/00_boy.jpg", "object/00_motorcycle.jpg", "animal/03_corgi.png"])]
    multi_dsg = [dsg(multi[0]["prompt"], ["Is there a boy?", "Is there a motorcycle?", "Is the boy riding the motorcycle?"],
                     [[0], [0], [1, 2]])]
    for name, data in (("XVerseBench_single", single), ("XVerseBench_single_DSG", single_dsg),
                       ("XVerseBench_multi", multi), ("XVerseBench_multi_DSG", multi_dsg)):
        (tools / f"{name}.json").write_text(json.dumps(data, indent=1))
    return root
