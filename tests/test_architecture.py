"""The dependency direction of DESIGN.md §4, checked on the source: never reversed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mosaic_kit"

# what each layer may import from mosaic_kit (itself included) and from outside
ALLOWED_INTERNAL = {
    "correspondence": {"correspondence"},
    "attention": {"correspondence", "attention"},
    "losses": {"correspondence", "attention", "losses"},
    "models": {"correspondence", "attention", "losses", "models"},
}
FORBIDDEN_EXTERNAL = {
    "correspondence": {"diffusers", "peft", "transformers", "accelerate"},
    "attention": {"diffusers", "peft", "transformers", "accelerate"},
    "losses": {"diffusers", "peft", "transformers", "accelerate"},
    "models": {"accelerate"},
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level]
                module = ".".join(base + ((node.module,) if node.module else ()))
            else:
                module = node.module or ""
            found.add(module)
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED_INTERNAL))
def test_layers_import_only_downwards(layer):
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for module in imports_of(path):
            parts = module.split(".")
            if parts[0] == "mosaic_kit" and len(parts) > 1:
                assert parts[1] in ALLOWED_INTERNAL[layer], f"{path.name} imports {module}"
            assert parts[0] not in FORBIDDEN_EXTERNAL[layer], f"{path.name} imports {module}"
