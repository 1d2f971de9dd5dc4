"""The project stands alone: no path of a development machine and no pointer to files outside the
repository (the team's shared folder, its design notes) in what users read and run: the package,
the docs, the README, the recipes, the benchmarks and the scripts."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ["mosaic_kit", "docs", "recipes", "benchmarks", "scripts", "README.md", "mkdocs.yml", "pyproject.toml"]
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".json", ".txt", ".js", ".cfg", ".ini"}

FORBIDDEN = {
    "an absolute path of a development machine": re.compile(
        r"(?<![\w.~-])/(?:work|root|workspace|mnt/data)/|(?<![\w.~-])/home/[\w.-]+|(?<![\w.~-])/Users/[\w.-]+"
        r"|\b[A-Z]:\\Users\\"),
    "the shared folder beside the repository": re.compile(
        r"\.\./shared\b|\bshared/(?:data|notes|paper|tools|hooks)\b|\bshared folder\b|[\"']shared[\"']\s*/",
        re.IGNORECASE),
    "the team's design notes outside the repository": re.compile(r"\bDESIGN\.md\b|\bDESIGN\s*§|\bSTYLE\.md\b"),
}


def scanned_files() -> list[Path]:
    files = []
    for name in SCANNED:
        path = ROOT / name
        candidates = [path] if path.is_file() else sorted(path.rglob("*"))
        files += [p for p in candidates if p.is_file() and p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts]
    return files


def findings(text: str) -> list[tuple[int, str, str]]:
    """``(line number, what, the match)`` of every forbidden pointer in ``text``."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        for what, pattern in FORBIDDEN.items():
            found += [(number, what, match.group(0)) for match in pattern.finditer(line)]
    return found


def test_no_machine_paths_or_pointers_outside_the_repository():
    files = scanned_files()
    assert len(files) > 100 and ROOT / "README.md" in files and ROOT / "recipes" / "configs" / "dataset_cpu.yaml" in files
    wrong = [f"{path.relative_to(ROOT)}:{number}: {what}: {match!r}"
             for path in files for number, what, match in findings(path.read_text(errors="replace"))]
    assert not wrong, "\n".join(wrong)


def test_the_scan_catches_what_the_issue_found():
    planted = [
        "root: the DreamBench folder (see `/work/shared/data/dreambench/README.md` for the layout)",
        'DEFAULT_DATA = ROOT.parent / "shared" / "data" / "dreambench"  # ../shared/data/dreambench',
        '"""Named settings: the paper\'s and the released code\'s (DESIGN §3)."""',
        "notes are `DESIGN.md` in the project's shared folder",
        "cache = '/home/alice/.cache' or '/root/.cache' or C:\\Users\\bob",
    ]
    kinds = [{what for _, what, _ in findings(line)} for line in planted]
    assert all(kinds), kinds
    assert "an absolute path of a development machine" in kinds[0] and "the shared folder beside the repository" in kinds[0]
    assert "the team's design notes outside the repository" in kinds[2] | kinds[3]
    assert len(findings(planted[4])) == 3
    fine = [
        "cache = Path.home() / '.cache' / 'mosaic_kit' / 'dreambench'  # ~/.cache/mosaic_kit/dreambench",
        "the shared utilities; a layout shared by the batch; shared/other machines",
        "https://github.com/google/dreambooth/archive/x.tar.gz; tests/data/dreambench_subset/",
    ]
    assert [findings(line) for line in fine] == [[], [], []]
