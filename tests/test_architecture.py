"""The layers of docs/architecture.md, checked on the source: every package of `mosaic_kit`
imports only the layers below it (and itself), the low layers never import the model libraries,
and no package imports another package's private modules or names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mosaic_kit"

# What each unit may import from mosaic_kit (itself included). A unit is a package, or a
# sub-package named on its own in this table (none today). The order is the layering of
# docs/architecture.md; a unit never imports one above it. ``dataset_builder`` sits on top: it
# drives the pipelines, the evaluation scorers and the feature extractors.
BASE = {"utils"}
CORE = BASE | {"correspondence", "attention", "losses"}
ALLOWED_INTERNAL = {
    "utils": BASE,
    "correspondence": BASE | {"correspondence"},
    "attention": BASE | {"correspondence", "attention"},
    "losses": CORE,
    "models": CORE | {"models"},
    "features": BASE | {"correspondence", "features"},
    "data": BASE | {"correspondence", "data"},
    "pipelines": CORE | {"models", "data", "pipelines"},
    "eval": CORE | {"models", "data", "pipelines", "eval"},
    "reporting": CORE | {"data", "eval", "reporting"},
    "training": CORE | {"models", "features", "data", "pipelines", "eval", "reporting", "training"},
    "dataset_builder": CORE | {"models", "features", "data", "pipelines", "eval", "dataset_builder"},
}
MODEL_LIBRARIES = {"diffusers", "peft", "transformers", "accelerate"}
FORBIDDEN_EXTERNAL = {
    "utils": MODEL_LIBRARIES,
    "correspondence": MODEL_LIBRARIES,
    "attention": MODEL_LIBRARIES,
    "losses": MODEL_LIBRARIES,
    "models": {"accelerate"},
    "features": {"accelerate"},
    "data": MODEL_LIBRARIES,
    "pipelines": {"accelerate"},
    "eval": {"accelerate"},
    "reporting": MODEL_LIBRARIES,
}

# Known exceptions, each with its reason; `test_known_exceptions_still_exist` fails once one is
# gone, so the list only shrinks.
KNOWN_UPWARD: set[tuple[str, str]] = set()


def unit_of(module: str) -> str | None:
    """``mosaic_kit.dataset_builder.build`` → ``dataset_builder``; ``mosaic_kit`` → None."""
    parts = module.split(".")
    if parts[0] != "mosaic_kit" or len(parts) < 2:
        return None
    if len(parts) > 2 and ".".join(parts[1:3]) in ALLOWED_INTERNAL:
        return ".".join(parts[1:3])
    return parts[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path = ROOT) -> list[tuple[str, list[str]]]:
    """``(module, imported names)`` of every import in ``path`` (relative ones resolved).

    ``from package import name`` where ``name`` is a module or sub-package of ``package`` (a file
    or folder under ``root``) is also an import of ``package.name``: ``from . import generation``
    in ``data/__init__.py`` imports ``mosaic_kit.data.generation``, not only ``mosaic_kit.data``.
    """
    tree = ast.parse(path.read_text())
    package = path.relative_to(root).with_suffix("").parts[:-1]  # the file's package
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ((node.module,) if node.module else ()))
            else:
                module = node.module or ""
            found.append((module, [alias.name for alias in node.names]))
            folder = root.joinpath(*module.split("."))
            found.extend((f"{module}.{alias.name}", []) for alias in node.names
                         if (folder / f"{alias.name}.py").is_file() or (folder / alias.name / "__init__.py").is_file())
    return found


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_package_has_a_layer():
    packages = {p.parent.relative_to(PACKAGE).as_posix().replace("/", ".") for p in PACKAGE.rglob("__init__.py")}
    units = {unit_of(f"mosaic_kit.{name}") for name in packages if name != "."}
    assert units <= set(ALLOWED_INTERNAL), f"packages without a layer: {sorted(units - set(ALLOWED_INTERNAL))}"
    assert {"data", "features", "eval", "pipelines", "training", "reporting", "utils"} <= units


def test_unit_of_and_relative_imports_resolve():
    assert unit_of("mosaic_kit.dataset_builder.build") == "dataset_builder"
    assert unit_of("mosaic_kit.data.collate") == "data"
    assert unit_of("mosaic_kit") is None and unit_of("torch.nn") is None
    imports = dict(imports_of(PACKAGE / "eval" / "synthetic" / "runner.py"))
    assert "mosaic_kit.eval.localisation" in imports and "mosaic_kit.attention" in imports
    assert "mosaic_kit.eval.synthetic.scores" in imports


@pytest.mark.parametrize("unit", sorted(ALLOWED_INTERNAL))
def test_layers_import_only_downwards(unit):
    wrong = []
    for path in sources():
        if unit_of(module_name(path)) != unit:
            continue
        name = path.relative_to(PACKAGE).as_posix()
        for module, _ in imports_of(path):
            target = unit_of(module)
            if target is not None and target not in ALLOWED_INTERNAL[unit] and (name, module) not in KNOWN_UPWARD:
                wrong.append(f"{name} imports {module}")
            if module.split(".")[0] in FORBIDDEN_EXTERNAL.get(unit, ()):
                wrong.append(f"{name} imports {module}")
    assert not wrong, "\n".join(wrong)


def _private(part: str) -> bool:
    return part.startswith("_") and not part.startswith("__")


def test_no_package_imports_another_packages_private_modules_or_names():
    wrong = []
    for path in sources():
        own = module_name(path).split(".")
        own_package = own[1] if len(own) > 1 else None
        for module, names in imports_of(path):
            parts = module.split(".")
            if parts[0] != "mosaic_kit" or len(parts) < 2 or parts[1] == own_package:
                continue
            if any(_private(part) for part in parts[1:]) or any(_private(name) for name in names):
                wrong.append(f"{path.relative_to(PACKAGE).as_posix()} imports {module} {names}")
    assert not wrong, "\n".join(wrong)


def test_recipes_and_benchmarks_use_only_public_modules():
    wrong = []
    for folder in ("recipes", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for module, names in imports_of(path):
                parts = module.split(".")
                if parts[0] == "mosaic_kit" and (any(_private(p) for p in parts) or any(_private(n) for n in names)):
                    wrong.append(f"{path.relative_to(ROOT).as_posix()} imports {module} {names}")
    assert not wrong, "\n".join(wrong)


def test_known_exceptions_still_exist():
    for name, module in KNOWN_UPWARD:
        assert module in dict(imports_of(PACKAGE / name)), f"{name} no longer imports {module}: drop the exception"


def test_a_planted_from_dot_import_of_a_subpackage_is_resolved_and_caught(tmp_path):
    # `from . import builder` in data/__init__.py reads as an import of `mosaic_kit.data` (its own
    # package) unless the name is resolved to the sub-package it is
    package = tmp_path / "mosaic_kit" / "data"
    (package / "builder").mkdir(parents=True)
    (package / "builder" / "__init__.py").write_text("")
    (package / "loader.py").write_text("")
    planted = package / "__init__.py"
    planted.write_text("from . import builder, loader\nfrom .. import training\n")
    (tmp_path / "mosaic_kit" / "training").mkdir()
    (tmp_path / "mosaic_kit" / "training" / "__init__.py").write_text("")
    found = [module for module, _ in imports_of(planted, tmp_path)]
    assert "mosaic_kit.data.builder" in found and "mosaic_kit.data.loader" in found
    assert "mosaic_kit.training" in found and unit_of("mosaic_kit.training") not in ALLOWED_INTERNAL["data"]
    # a name that is not a module (a function, a class) adds nothing
    planted.write_text("from .loader import collate\n")
    assert [module for module, _ in imports_of(planted, tmp_path)] == ["mosaic_kit.data.loader"]


def test_a_planted_upward_or_private_import_is_caught(tmp_path):
    source = PACKAGE / "correspondence" / "grid.py"
    planted = tmp_path / "mosaic_kit" / "correspondence" / "grid.py"
    planted.parent.mkdir(parents=True)
    planted.write_text(source.read_text() + "\nfrom ..models import MosaicFluxTransformer\nfrom ..data._images import to_rgb\n")
    found = [module for module, _ in imports_of(planted, tmp_path)]
    assert len(found) == len(imports_of(source)) + 2
    assert found[-2:] == ["mosaic_kit.models", "mosaic_kit.data._images"]
    assert unit_of(found[-2]) not in ALLOWED_INTERNAL["correspondence"]
    assert any(_private(part) for part in found[-1].split("."))


TESTS = ROOT / "tests"
TOP_LEVEL_TESTS = {"test_architecture.py", "test_docs_site.py", "test_standalone.py"}  # about the whole repository


def test_tests_mirror_the_package_folders():
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} | {"recipes", "benchmarks"}
    misplaced = []
    for path in sorted(TESTS.rglob("test_*.py")):
        relative = path.relative_to(TESTS)
        if len(relative.parts) == 1:
            if path.name not in TOP_LEVEL_TESTS:
                misplaced.append(relative.as_posix())
        elif relative.parts[0] not in folders:
            misplaced.append(relative.as_posix())
    assert not misplaced, f"tests outside tests/<package>/: {misplaced}"
    names = [p.name for p in TESTS.rglob("test_*.py")]
    assert len(names) == len(set(names)), "test file names must stay unique (pytest imports them by basename)"
    assert all(folder in folders for folder in (p.name for p in TESTS.iterdir() if p.is_dir() and p.name != "__pycache__"))


# -- model families: chosen by name from one registry, compared nowhere else ----------------------------
REGISTRY = PACKAGE / "pipelines" / "registry.py"


def family_name_uses(path: Path, names: set[str]) -> list[str]:
    """Where ``path`` compares a value with a family name (``== "flux2"``, ``in ("flux1", ...)``),
    lists family names, or keys a mapping by them: what only the registry may do."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for operand in operands:
                items = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
                if any(isinstance(i, ast.Constant) and i.value in names for i in items):
                    found.append(f"line {node.lineno}: a comparison with a family name")
                    break
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            if any(isinstance(i, ast.Constant) and i.value in names for i in node.elts):
                found.append(f"line {node.lineno}: a list of family names")
        elif isinstance(node, ast.Dict):
            if any(isinstance(k, ast.Constant) and k.value in names for k in node.keys):
                found.append(f"line {node.lineno}: a mapping keyed by family names")
    return found


def registered_family_names() -> set[str]:
    pytest.importorskip("diffusers")
    from mosaic_kit.pipelines.registry import family_names

    return set(family_names())


def test_no_family_name_is_compared_outside_the_registry():
    names = registered_family_names()
    wrong = []
    for path in [*sources(), *sorted((ROOT / "recipes").rglob("*.py")), *sorted((ROOT / "benchmarks").rglob("*.py"))]:
        if path == REGISTRY:
            continue
        wrong.extend(f"{path.relative_to(ROOT).as_posix()} {where}" for where in family_name_uses(path, names))
    assert not wrong, "\n".join(wrong)


def test_a_planted_family_name_comparison_is_caught(tmp_path):
    names = registered_family_names()
    planted = tmp_path / "trainer.py"
    planted.write_text('family = "flux1"  # a default is fine\nif cfg.family == "flux2":\n    pass\n'
                       'FAMILIES = ("flux1", "flux2")\nDEFAULTS = {"flux1": 512}\nok = cfg.family in family_names()\n')
    assert family_name_uses(planted, names) == [
        "line 2: a comparison with a family name", "line 4: a list of family names", "line 5: a mapping keyed by family names"]
