"""The whole data-building pipeline over per-item records: stages, resume, shards, manifest, summary.

`DatasetBuilder` runs the stages of `STAGES` for the items of one shard. Each stage reads the
previous stages' records, writes its files and then its record (`StageStore`), and skips items it
already finished, so a killed run resumes and one stage can be rerun alone (delete its folder, or
pass ``overwrite=True``). An item that fails a stage (a missing file, a rejection) gets a record
with ``kept: false`` and its reasons; later stages skip it.

Every record holds the digest of the settings it was made under (`stage_settings`: the keys of
its stage and of the stages before it), and ``<output_dir>/configs/<digest>.json`` keeps those settings.
A record made under other settings is stale: `DatasetBuilder.run` refuses to start while this
shard has one that the run would keep (naming the changed keys), unless it overwrites that stage;
a stage rerun (``overwrite=True``, or the stage's folder deleted) redoes stale records, and
`DatasetBuilder.finish` leaves stale records out of the manifest and counts them in the summary.

`DatasetBuilder.finish` (any shard, after all shards for the full data set) writes:

- ``manifest.jsonl``: one line per accepted item in the format of `mosaic_kit.data.manifest`
  (target, references, per-subject target masks, reference masks, pixel pairs, caption,
  subjects, and in ``meta`` the provenance of every stage); it trains with
  ``recipes/flux_mosaic_train.py`` (``data.kind: manifest``);
- ``summary.json``: per stage, items done and kept and rejections per reason (an item may fail
  several criteria), the items accepted and rejected, seconds per item of this run;
- ``sheets/accepted.png`` and ``sheets/rejected.png``: contact sheets with masks and matches drawn.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ..correspondence import TokenGrid, draw_matches, is_disjoint
from ..utils.atomic import save_image_atomic
from ..data import load_mask, open_image, resize_mask, to_rgb
from ..utils.images import pil_to_tensor
from .config import RESUME_NEUTRAL_KEYS, DatasetBuildConfig, resolve_path, stage_settings
from .correspondences import subject_pairs
from .filtering import ClipQualityScore, SharpnessScore, decide, subject_scores
from .images import GeneratedImage, tensor_to_pil
from .sheets import overlay_masks, panel_sheet
from .stage_models import build_clip, build_editor, build_extractors, build_images, build_rewriter, build_segmenter
from .prompts import PromptRecord, PromptTemplates, prompts_from_file
from .records import STAGES, StageStore, in_shard, read_text_utf8, reject_reason_key, write_text_atomic
from .references import cutout
from .subjects import DetectedSubjects

__all__ = ["DatasetBuilder"]

_ITEM_ERRORS = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)
"""What fails one item (recorded as its error), not the run: missing, unreadable, truncated or too
large files (a stage object that opens images itself may let PIL's DecompressionBombError through)."""
_DIGEST = "settings_digest"
"""The record key holding the digest of the settings (`stage_settings`) the record was made under."""
log = logging.getLogger(__name__)


def _digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _save_mask(mask: torch.Tensor, path: Path) -> None:
    save_image_atomic(tensor_to_pil(mask.bool()), path)


def _open(path: Path) -> Image.Image:
    """An image file as RGB, through the data package's checked reader (missing, corrupt,
    truncated and decompression-bomb files raise a ValueError naming the file)."""
    return to_rgb(open_image(path), str(path))


class DatasetBuilder:
    """Runs the data-building stages of one shard from a `DatasetBuildConfig`.

    Args:
        config: the configuration.
        shard: ``(i, n)``: this shard of ``n`` (items are assigned by `in_shard`).
        progress: show one tqdm bar per stage.
        overwrite: redo items that already have a record (in the stages run); needed to redo
            records made under other settings (`check_resume`).
        models: optional prebuilt stage objects by name (``"rewriter"``, ``"images"``,
            ``"subjects"``, ``"clip"``, ``"editor"``, ``"extractors"``), instead of building them
            from the config (tests pass tiny models this way).

    Attributes:
        settings: per stage, the settings its records depend on (`stage_settings`).
        digests: per stage, the digest of those settings that each of its records carries.

    Examples:
        >>> import tempfile
        >>> from mosaic_kit.dataset_builder import dataset_config_from_dict
        >>> root = Path(tempfile.mkdtemp())
        >>> for name in ("dog", "cat"):
        ...     (root / "photos" / name).mkdir(parents=True)
        ...     for i in range(2):
        ...         Image.effect_noise((64, 64), 60).convert("RGB").save(root / "photos" / name / f"{i}.png")
        >>> _ = (root / "prompts.json").write_text(json.dumps([{"prompt": "a {dog} and a {cat}", "subjects": ["dog", "cat"]}]))
        >>> config = dataset_config_from_dict({"output_dir": str(root / "out"),
        ...     "prompts": {"source": "file", "file": str(root / "prompts.json")},
        ...     "images": {"source": "photo_composites", "root": str(root / "photos"), "canvas_size": 128},
        ...     "subjects": {"source": "files", "segmenter": None}, "references": {"source": "other_views", "size": 32},
        ...     "correspondences": {"grid": 16, "target_size": 64, "ref_size": 32}})
        >>> builder = DatasetBuilder(config, progress=False)
        >>> builder.run()
        >>> summary = builder.finish()
        >>> summary["items"], summary["accepted"], (root / "out" / "manifest.jsonl").is_file()
        (1, 1, True)
    """

    def __init__(self, config: DatasetBuildConfig, shard: tuple[int, int] = (0, 1), *, progress: bool = True,
                 overwrite: bool = False, models: dict[str, Any] | None = None) -> None:
        if not isinstance(config, DatasetBuildConfig):
            raise ValueError(f"Expected `config` to be a DatasetBuildConfig, but got {type(config).__name__}.")
        in_shard("check", *shard)  # validates the shard
        self.config, self.shard, self.progress, self.overwrite = config, tuple(shard), progress, overwrite
        self.out = Path(config.output_dir)
        self.stores = {stage: StageStore(self.out, stage) for stage in STAGES}
        self.models: dict[str, Any] = dict(models or {})
        self.timings: dict[str, dict[str, float]] = {}
        self.settings = {stage: stage_settings(config, stage) for stage in STAGES}
        self.digests = {stage: _digest(settings) for stage, settings in self.settings.items()}
        self._links: dict[tuple[str, str], tuple[bool, str | None] | None] = {}  # during run(): (kept, digest)

    # -- plan -------------------------------------------------------------------------------------
    def plan(self) -> list[PromptRecord]:
        """Every item's prompt before rewriting (all shards; cheap and deterministic)."""
        cfg = self.config.prompts
        if cfg.source == "file":
            names = cfg.names
            if isinstance(names, str):  # a DreamBench-style prompts.json: subjects[].name → class
                data = json.loads(read_text_utf8(resolve_path(names)))
                names = {s["name"]: s["class"] for s in data["subjects"]}
            return prompts_from_file(resolve_path(cfg.file), names=names)[: cfg.count]
        try:
            sampler = PromptTemplates(**cfg.templates)
        except TypeError as error:
            raise ValueError(f"Expected `prompts.templates` to hold arguments of PromptTemplates, but: {error}") from None
        return sampler.sample(cfg.count, seed=self.config.seed)

    def _mine(self, ids: Sequence[str]) -> list[str]:
        return [i for i in ids if in_shard(i, *self.shard)]

    def _fresh(self, stage: str, record: dict[str, Any]) -> bool:
        """Whether ``record`` was made under this configuration's settings for ``stage``."""
        return record.get(_DIGEST) == self.digests[stage]

    def _link(self, stage: str, item_id: str) -> tuple[bool, bool] | None:
        """``(kept, fresh)`` of the item's record in ``stage``, None without one; cached during
        `run` (which writes this shard's records only: `_write` updates the cache)."""
        key = (stage, item_id)
        if key not in self._links:
            store = self.stores[stage]
            record = store.read(item_id) if store.done(item_id) else None
            self._links[key] = None if record is None else (bool(record.get("kept", True)), record.get(_DIGEST))
        link = self._links[key]
        return None if link is None else (link[0], link[1] == self.digests[stage])

    def _link_chain(self, item_id: str, depth: int = len(STAGES)) -> list[tuple[str, bool, bool]]:
        """`_chain` as ``(stage, kept, fresh)`` from `_link`."""
        chain = []
        for stage in STAGES[:depth]:
            link = self._link(stage, item_id)
            if link is None:
                break
            chain.append((stage, *link))
            if not link[0]:
                break
        return chain

    def _chain(self, item_id: str) -> list[tuple[str, dict[str, Any]]]:
        """The item's records stage by stage, up to the first missing stage or the first rejection
        (included): the records its outcome rests on. Records after a gap or a rejection (left by
        an earlier run) are not part of it."""
        chain = []
        for stage in STAGES:
            store = self.stores[stage]
            if not store.done(item_id):
                break
            record = store.read(item_id)
            chain.append((stage, record))
            if not record.get("kept", True):
                break
        return chain

    def _todo(self, stage: str, ids: Sequence[str]) -> list[str]:
        """Ids to (re)do: without a record, with a stale one, or every id with ``overwrite``."""
        return [i for i in ids if self.overwrite or self._link(stage, i) is None or not self._link(stage, i)[1]]

    def _kept(self, stage: str, ids: Sequence[str]) -> list[str]:
        """Ids whose records up to ``stage`` all exist, are fresh and are not rejections."""
        depth = STAGES.index(stage) + 1
        out = []
        for item_id in ids:
            chain = self._link_chain(item_id, depth)
            if len(chain) == depth and all(kept and fresh for _, kept, fresh in chain):
                out.append(item_id)
        return out

    def _prompt(self, item_id: str) -> PromptRecord:
        record = dict(self.stores["prompts"].read(item_id))
        record.pop(_DIGEST, None)
        return PromptRecord.from_dict(record)

    def _write(self, stage: str, item_id: str, record: dict[str, Any]) -> None:
        self.stores[stage].write(item_id, {**record, _DIGEST: self.digests[stage]})
        if (stage, item_id) in self._links:
            self._links[(stage, item_id)] = (bool(record.get("kept", True)), self.digests[stage])

    def _bar(self, stage: str, ids: Sequence[str]):
        return tqdm(ids, desc=f"{stage} {self.shard[0]}/{self.shard[1]}", unit="item", disable=not self.progress)

    def _timed(self, stage: str, count: int, seconds: float) -> None:
        entry = self.timings.setdefault(stage, {"items": 0, "seconds": 0.0})
        entry["items"] += count
        entry["seconds"] += seconds

    def _fail(self, stage: str, item_id: str, reason: str) -> None:
        self._write(stage, item_id, {"id": item_id, "kept": False, "reasons": [reason]})

    # -- models -----------------------------------------------------------------------------------
    def _model(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self.models:
            self.models[key] = build()
        return self.models[key]

    # -- stages -----------------------------------------------------------------------------------
    def run(self, stages: Sequence[str] | None = None) -> None:
        """Runs ``stages`` (default: all, in order) for this shard's items, after `check_resume`.

        Raises:
            ValueError: for an unknown stage, or (from `check_resume`, before anything is
                written) when this shard has records made under other settings that the run
                would keep.
        """
        stages = self._stages(stages)
        plan = self.plan()
        by_id = {record.id: record for record in plan}
        ids = self._mine(list(by_id))
        try:
            self._check_resume(ids, stages)
            for stage in STAGES:  # the settings every record's digest stands for
                path = self.out / "configs" / f"{self.digests[stage]}.json"
                if not path.is_file():
                    write_text_atomic(path, json.dumps(self.settings[stage], indent=1))
            for stage in STAGES:
                if stage in stages:
                    getattr(self, f"_stage_{stage}")(ids, by_id)
        finally:
            self._links.clear()

    @staticmethod
    def _stages(stages: Sequence[str] | None) -> list[str]:
        stages = list(STAGES if stages is None else stages)
        for stage in stages:
            if stage not in STAGES:
                raise ValueError(f"Expected stages among {list(STAGES)}, but got {stage!r}.")
        return stages

    def check_resume(self, stages: Sequence[str] | None = None) -> None:
        """Refuses to resume over records made under other settings, before anything is written.

        A record of this shard's items is stale when its stage's settings (`stage_settings`)
        differ from the configuration's. The run may go on only if it redoes every stale record
        that the items' outcomes rest on: ``overwrite=True`` with each stage that has one among
        ``stages``. Records of other shards are theirs to check. `RESUME_NEUTRAL_KEYS` never
        make a record stale.

        Args:
            stages: the stages the run will run (default: all).

        Raises:
            ValueError: naming each changed key (old -> new value), the stages and item counts of
                the stale records, and how to redo them.
        """
        stages = self._stages(stages)
        try:
            self._check_resume(self._mine([record.id for record in self.plan()]), stages)
        finally:
            self._links.clear()

    def _check_resume(self, ids: Sequence[str], stages: Sequence[str]) -> None:
        redone = set(stages) if self.overwrite else set()
        stale: dict[str, Counter] = {}
        for item_id in ids:
            for stage, _, fresh in self._link_chain(item_id):
                if stage not in redone and not fresh:
                    stale.setdefault(stage, Counter())[self._links[(stage, item_id)][1]] += 1
        if not stale:
            return
        changed: dict[str, tuple[Any, Any]] = {}
        unknown = []
        for stage, digests in stale.items():
            new = self.settings[stage]
            for digest in digests:
                path = self.out / "configs" / f"{digest}.json"
                if digest is None or not path.is_file():
                    unknown.append(stage)
                    continue
                old = json.loads(path.read_text(encoding="utf-8"))
                for key in sorted(set(old) | set(new)):
                    if old.get(key, "<unset>") != new.get(key, "<unset>"):
                        changed[key] = (old.get(key, "<unset>"), new.get(key, "<unset>"))
        order = [s for s in STAGES if s in stale]
        keys = "; ".join(f"{k}: {_shown(a)} -> {_shown(b)}" for k, (a, b) in sorted(changed.items()))
        if unknown:
            keys += ("; " if keys else "") + f"records of {sorted(set(unknown), key=STAGES.index)} carry no saved settings"
        counts = ", ".join(f"{s} ({sum(stale[s].values())} items)" for s in order)
        flags = " ".join(f"--stage {s}" for s in order)
        raise ValueError(
            f"Expected to resume {self.out} under the settings its records were made with, but they changed "
            f"({keys}); shard {self.shard[0]}/{self.shard[1]} has records made under the old settings in {counts}, which "
            f"this run would keep. Redo them with overwrite=True and those stages (recipes/build_dataset.py --overwrite "
            f"{flags}), or build into a new `output_dir`. Nothing was written. Keys that never block a resume: "
            f"{', '.join(RESUME_NEUTRAL_KEYS)}."
        )

    def _stage_prompts(self, ids: list[str], by_id: dict[str, PromptRecord]) -> None:
        rewriter = self._model("rewriter", lambda: build_rewriter(self.config)) if self.config.prompts.rewriter else None
        start, todo = time.perf_counter(), self._todo("prompts", ids)
        for item_id in self._bar("prompts", todo):
            record = by_id[item_id]
            if rewriter is not None:
                record = rewriter(record)
            self._write("prompts", item_id, record.to_dict())
        self._timed("prompts", len(todo), time.perf_counter() - start)

    def _stage_images(self, ids: list[str], by_id: dict[str, PromptRecord]) -> None:
        store = self.stores["images"]
        todo = self._todo("images", self._kept("prompts", ids))
        source = self._model("images", lambda: build_images(self.config))
        batch = max(1, getattr(source, "batch_size", 1))
        start = time.perf_counter()
        bar = self._bar("images", todo)
        for first in range(0, len(todo), batch):
            chunk = todo[first:first + batch]
            records = [self._prompt(i) for i in chunk]
            try:
                images = source(records)
            except _ITEM_ERRORS as error:
                if len(chunk) > 1:
                    raise
                self._fail("images", chunk[0], f"image_error: {error}")
                bar.update(1)
                continue
            for record, generated in zip(records, images):
                self._write_image(record, generated)
            bar.update(len(chunk))
        bar.close()
        self._timed("images", len(todo), time.perf_counter() - start)

    def _write_image(self, record: PromptRecord, generated: GeneratedImage) -> None:
        folder = self.out / "images"
        save_image_atomic(generated.image, folder / f"{record.id}.png")
        if generated.subject_masks:  # the exact regions: a box file the subjects stage can read
            entries = []
            for k, (name, mask) in enumerate(zip(record.subjects, generated.subject_masks)):
                ys, xs = torch.nonzero(mask, as_tuple=True)
                box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] if len(xs) else None
                if box is None:
                    continue
                _save_mask(mask, folder / "boxes" / f"{record.id}_{k}.png")
                entries.append({"name": name, "box": box, "score": 1.0, "mask": f"{record.id}_{k}.png"})
            write_text_atomic(folder / "boxes" / f"{record.id}.json", json.dumps({"subjects": entries}))
        self._write("images", record.id, {
            "id": record.id, "file": f"images/{record.id}.png", "width": generated.image.width,
            "height": generated.image.height, "seed": generated.seed, "provenance": generated.provenance,
            "other_views": generated.other_views,
        })

    def _stage_subjects(self, ids: list[str], by_id: dict[str, PromptRecord]) -> None:
        from .subjects import SubjectsFromFiles

        cfg = self.config.subjects
        todo = self._todo("subjects", self._kept("images", ids))
        finder = segmenter = None
        if todo and cfg.source == "files":  # boxes without masks are segmented when a segmenter is named
            folder = resolve_path(cfg.folder) if cfg.folder else self.out / "images" / "boxes"
            sam = self._model("subjects", lambda: build_segmenter(self.config)) if cfg.segmenter else None
            finder = SubjectsFromFiles(folder, sam)
        elif todo:
            segmenter = self._model("subjects", lambda: build_segmenter(self.config))
        start = time.perf_counter()
        for item_id in self._bar("subjects", todo):
            prompt = self._prompt(item_id)
            image = _open(self.out / self.stores["images"].read(item_id)["file"])
            try:
                found = finder(item_id, image, prompt.subjects) if finder else segmenter(image, prompt.subjects)
            except _ITEM_ERRORS as error:
                self._fail("subjects", item_id, f"subjects_error: {error}")
                continue
            self._write_subjects(item_id, found)
        self._timed("subjects", len(todo), time.perf_counter() - start)

    def _write_subjects(self, item_id: str, found: DetectedSubjects) -> None:
        masks = []
        for k, mask in enumerate(found.masks):
            if mask is None:
                masks.append(None)
                continue
            name = f"subjects/{item_id}_{k}.png"
            _save_mask(mask, self.out / name)
            masks.append(name)
        self._write("subjects", item_id, {
            "id": item_id, "names": found.names, "boxes": found.boxes, "scores": found.scores, "masks": masks,
            "mask_scores": found.mask_scores, "counts": found.counts, "provenance": found.provenance,
        })

    def _load_subjects(self, item_id: str, size: tuple[int, int]) -> DetectedSubjects:
        data = self.stores["subjects"].read(item_id)
        masks = [None if m is None else resize_mask(load_mask(self.out / m), size) for m in data["masks"]]
        return DetectedSubjects(data["names"], data["boxes"], data["scores"], masks, data["mask_scores"], data["counts"],
                                data["provenance"])

    def _stage_filter(self, ids: list[str], by_id: dict[str, PromptRecord]) -> None:
        cfg = self.config.filter
        thresholds = cfg.thresholds
        todo = self._todo("filter", self._kept("subjects", ids))
        clip = self._model("clip", lambda: build_clip(self.config)) if cfg.clip and todo else None
        quality = None
        if cfg.quality == "sharpness":
            quality = SharpnessScore()
        elif cfg.quality == "clip_iqa" and todo:
            quality = ClipQualityScore(clip)
        start = time.perf_counter()
        for item_id in self._bar("filter", todo):
            prompt = self._prompt(item_id)
            image = _open(self.out / self.stores["images"].read(item_id)["file"])
            scores: dict[str, Any] = subject_scores(self._load_subjects(item_id, (image.height, image.width)),
                                                    (image.height, image.width))
            if clip is not None:
                scores["clip"] = float(clip.clip_t([image], prompt.prompt)[0])
            if quality is not None:
                scores["quality"] = float(quality([image])[0])
                scores["quality_score"] = quality.name
            kept, reasons = decide(scores, thresholds)
            self._write("filter", item_id, {"id": item_id, "kept": kept, "reasons": reasons, "scores": scores,
                                                   "thresholds": vars(thresholds)})
        self._timed("filter", len(todo), time.perf_counter() - start)

    def _stage_references(self, ids: list[str], by_id: dict[str, PromptRecord]) -> None:
        cfg = self.config.references
        todo = self._todo("references", self._kept("filter", ids))
        editor = self._model("editor", lambda: build_editor(self.config)) if cfg.source == "editor" and todo else None
        mapping = None
        if cfg.source == "files":
            mapping = json.loads(read_text_utf8(resolve_path(cfg.files)))
        start = time.perf_counter()
        for item_id in self._bar("references", todo):
            try:
                self._write_references(item_id, editor, mapping)
            except _ITEM_ERRORS as error:
                self._fail("references", item_id, f"reference_error: {error}")
        self._timed("references", len(todo), time.perf_counter() - start)

    def _write_references(self, item_id: str, editor: Any, mapping: dict | None) -> None:
        cfg = self.config.references
        prompt = self._prompt(item_id)
        image_record = self.stores["images"].read(item_id)
        image = _open(self.out / image_record["file"])
        found = self._load_subjects(item_id, (image.height, image.width))
        entries = []
        for k, (name, mask) in enumerate(zip(prompt.subjects, found.masks)):
            if mask is None or not bool(mask.any()):
                raise ValueError(f"subject {k} ({name}) has no mask")
            path, mask_path = f"references/{item_id}_{k}.png", f"references/{item_id}_{k}_mask.png"
            if cfg.source in ("files", "other_views"):
                if cfg.source == "files":
                    files = mapping.get(item_id) if isinstance(mapping, dict) else None
                else:
                    files = [views[0] if views else None for views in image_record.get("other_views") or []]
                if not files or len(files) != len(prompt.subjects) or files[k] is None:
                    raise ValueError(f"no reference file for subject {k} ({name}) of item {item_id}")
                view = _open(Path(files[k])).resize((cfg.size, cfg.size), Image.BICUBIC)
                save_image_atomic(view, self.out / path)
                entries.append({"file": path, "mask": None, "source": cfg.source, "from": str(files[k])})
                continue
            cut, cut_mask = cutout(image, mask, cfg.size, margin=cfg.margin, background=cfg.background)
            if editor is None:
                save_image_atomic(cut, self.out / path)
                _save_mask(cut_mask, self.out / mask_path)
                entries.append({"file": path, "mask": mask_path, "source": "cutout"})
            else:
                view, info = editor(cut, name, f"{item_id}/{k}")
                save_image_atomic(view, self.out / path)
                entries.append({"file": path, "mask": None, "source": "editor", **info})
        self._write("references", item_id, {"id": item_id, "references": entries})

    def _stage_correspondences(self, ids: list[str], by_id: dict[str, PromptRecord]) -> None:
        todo = self._todo("correspondences", self._kept("references", ids))
        extractors = self._model("extractors", lambda: build_extractors(self.config)) if todo else None
        start = time.perf_counter()
        for item_id in self._bar("correspondences", todo):
            try:
                self._write_correspondences(item_id, extractors)
            except _ITEM_ERRORS as error:
                self._fail("correspondences", item_id, f"correspondence_error: {error}")
        self._timed("correspondences", len(todo), time.perf_counter() - start)

    def _write_correspondences(self, item_id: str, extractors: list) -> None:
        cfg = self.config.correspondences
        tsize, rsize = cfg.target_size, cfg.ref_size
        prompt = self._prompt(item_id)
        image = _open(self.out / self.stores["images"].read(item_id)["file"]).resize((tsize, tsize), Image.BICUBIC)
        found = self._load_subjects(item_id, (tsize, tsize))
        ref_entries = self.stores["references"].read(item_id)["references"]
        references = [_open(self.out / e["file"]).resize((rsize, rsize), Image.BICUBIC) for e in ref_entries]
        ref_masks = [None if e["mask"] is None else resize_mask(load_mask(self.out / e["mask"]), (rsize, rsize))
                     for e in ref_entries]
        target_masks = [m if m is not None else torch.zeros(tsize, tsize, dtype=torch.bool) for m in found.masks]
        result = subject_pairs(pil_to_tensor(image), target_masks, [pil_to_tensor(r) for r in references], ref_masks,
                               extractors, match_filter=cfg.filter, cycle_radius=cfg.cycle_radius,
                               consensus_radius=cfg.consensus_radius, disjoint=cfg.disjoint, max_points=cfg.max_points)
        counts = [int(p.shape[0]) for p in result.pairs]
        few = [k for k, c in enumerate(counts) if c < cfg.min_pairs]
        folder = f"correspondences/{item_id}"
        if few:
            self._write("correspondences", item_id, {
                "id": item_id, "kept": False, "num_pairs": counts,
                "reasons": [f"few_pairs: references {few} have fewer than {cfg.min_pairs} pairs"],
            })
            return
        save_image_atomic(image, self.out / folder / "target.png")
        for k, (reference, mask, ref_mask) in enumerate(zip(references, target_masks, ref_masks)):
            save_image_atomic(reference, self.out / folder / f"ref_{k}.png")
            _save_mask(mask, self.out / folder / f"target_mask_{k}.png")
            if ref_mask is not None:
                _save_mask(ref_mask, self.out / folder / f"ref_mask_{k}.png")
        pairs = [[[round(v, 3) for v in pair] for pair in p.tolist()] for p in result.pairs]
        write_text_atomic(self.out / folder / "pairs.json", json.dumps(pairs))
        provenance = {stage: self._provenance(stage, item_id) for stage in STAGES[:-1]}
        provenance["correspondences"] = {"extractors": list(cfg.extractors), "grid": cfg.grid, "filter": cfg.filter,
                                         "disjoint": cfg.disjoint, "eq2_disjoint": bool(is_disjoint(result.corr).all())}
        line = {
            "id": item_id, "target": f"{folder}/target.png",
            "references": [f"{folder}/ref_{k}.png" for k in range(len(references))],
            "caption": prompt.prompt, "subjects": list(prompt.subjects),
            "target_masks": [f"{folder}/target_mask_{k}.png" for k in range(len(references))],
            "reference_masks": [None if m is None else f"{folder}/ref_mask_{k}.png" for k, m in enumerate(ref_masks)],
            "correspondences": f"{folder}/pairs.json", "meta": {"provenance": provenance},
        }
        self._write("correspondences", item_id, {"id": item_id, "kept": True, "num_pairs": counts,
                                                        "manifest": line})

    def _provenance(self, stage: str, item_id: str) -> dict[str, Any]:
        record = self.stores[stage].read(item_id)
        keep = {"prompts": ("template", "rewritten", "provenance", "identities"), "images": ("seed", "provenance"),
                "subjects": ("boxes", "scores", "mask_scores", "counts", "provenance"), "filter": ("scores",),
                "references": ("references",)}[stage]
        return {key: record.get(key) for key in keep}

    # -- outputs ----------------------------------------------------------------------------------
    def _outcome(self, chain: list[tuple[str, dict[str, Any]]]) -> tuple[str, str | None, dict[str, Any] | None]:
        """``(outcome, stage, record)`` of an item's `_chain`: ``"stale"`` at its first record made
        under other settings, else ``"rejected"`` at its rejection, ``"accepted"`` with a kept
        correspondences record, or ``"pending"`` (stages still to run)."""
        for stage, record in chain:
            if not self._fresh(stage, record):
                return "stale", stage, record
        if not chain:
            return "pending", None, None
        stage, record = chain[-1]
        if not record.get("kept", True):
            return "rejected", stage, record
        return ("accepted" if stage == STAGES[-1] else "pending"), stage, record

    def finish(self) -> dict[str, Any]:
        """Writes ``manifest.jsonl``, ``summary.json`` and the contact sheets from every record in
        the output folder (all shards written so far); returns the summary.

        An item counts by its chain of records (`prompts` on, up to a gap or a rejection): records
        left after a gap or a rejection by an earlier run do not count, and a record made under
        other settings (and everything after it) is left out of the manifest and counted in
        ``summary["stale"]`` per stage (a warning is logged).
        """
        plan = [r.id for r in self.plan()]
        summary: dict[str, Any] = {"items": len(plan), "stages": {}, "rejected": {}}
        done, kept = Counter(), Counter()
        rejected: dict[str, Counter] = {stage: Counter() for stage in STAGES}
        stale: Counter = Counter()
        outcomes = {}
        for item_id in plan:
            chain = self._chain(item_id)
            outcomes[item_id] = outcome = self._outcome(chain)
            for stage, record in chain:
                if outcome[0] == "stale" and stage == outcome[1]:
                    stale[stage] += 1
                    break
                done[stage] += 1
                if record.get("kept", True):
                    kept[stage] += 1
                else:
                    rejected[stage].update(reject_reason_key(r) for r in record["reasons"])
        for stage in STAGES:
            summary["stages"][stage] = {"done": done[stage], "kept": kept[stage],
                                        "rejected": dict(sorted(rejected[stage].items()))}
            for key, count in rejected[stage].items():
                summary["rejected"][key] = summary["rejected"].get(key, 0) + count
        lines = [record["manifest"] for outcome, _, record in outcomes.values() if outcome == "accepted"]
        summary["accepted"] = len(lines)
        summary["rejected_items"] = sum(outcome == "rejected" for outcome, _, _ in outcomes.values())
        summary["stale"] = {stage: stale[stage] for stage in STAGES if stale[stage]}
        if stale:
            log.warning("%s: %d items have records made under other settings (%s), left out of the manifest; "
                        "rerun those stages with overwrite", self.out, sum(stale.values()), summary["stale"])
        summary["seconds_per_item"] = {stage: round(t["seconds"] / t["items"], 4)
                                       for stage, t in self.timings.items() if t["items"]}
        write_text_atomic(self.out / "manifest.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
        summary["sheets"] = self._write_sheets(outcomes)
        write_text_atomic(self.out / "summary.json", json.dumps(summary, indent=2))
        return summary

    def write_sheets(self, plan: Sequence[str]) -> list[str]:
        """``sheets/accepted.png`` and ``sheets/rejected.png`` (up to ``config.sheets`` items each,
        by the items' chains of records as in `finish`)."""
        return self._write_sheets({item_id: self._outcome(self._chain(item_id)) for item_id in plan})

    def _write_sheets(self, outcomes: dict[str, tuple[str, str | None, dict[str, Any] | None]]) -> list[str]:
        accepted = [item_id for item_id, (outcome, _, _) in outcomes.items() if outcome == "accepted"]
        rejected = [(item_id, stage, record["reasons"]) for item_id, (outcome, stage, record) in outcomes.items()
                    if outcome == "rejected"]
        written = []
        for name, rows in (("accepted", [self._accepted_row(i) for i in accepted[: self.config.sheets]]),
                           ("rejected", [self._rejected_row(*r) for r in rejected[: self.config.sheets]])):
            path = self.out / "sheets" / f"{name}.png"
            if rows:
                save_image_atomic(panel_sheet(rows, min_width=480), path)
                written.append(str(path.relative_to(self.out)))
            else:  # an older sheet would show items that are no longer accepted (or rejected)
                path.unlink(missing_ok=True)
        return written

    def _accepted_row(self, item_id: str) -> tuple[list[Image.Image], str]:
        line = self.stores["correspondences"].read(item_id)["manifest"]
        target = _open(self.out / line["target"])
        masks = [load_mask(self.out / m) for m in line["target_masks"]]
        pairs = json.loads((self.out / line["correspondences"]).read_text())
        panels = [overlay_masks(target, masks)]
        for k, path in enumerate(line["references"]):
            reference = pil_to_tensor(_open(self.out / path))
            p = torch.tensor(pairs[k]).reshape(-1, 4)
            canvas = draw_matches(reference, pil_to_tensor(target), p[:, :2], p[:, 2:], max_lines=40, seed=k)
            panels.append(tensor_to_pil(canvas))
        counts = [len(p) for p in pairs]
        return panels, f"{item_id} kept: {line['caption'][:60]} | pairs {counts}"

    def _rejected_row(self, item_id: str, stage: str, reasons: list[str]) -> tuple[list[Image.Image], str]:
        image = _open(self.out / self.stores["images"].read(item_id)["file"]) if self.stores["images"].done(item_id) \
            and "file" in self.stores["images"].read(item_id) else Image.new("RGB", (128, 128), "grey")
        masks, boxes = [], []
        if self.stores["subjects"].done(item_id) and "names" in self.stores["subjects"].read(item_id):
            found = self._load_subjects(item_id, (image.height, image.width))
            masks = [m for m in found.masks if m is not None]
            boxes = [b for b in found.boxes if b is not None]
        return [overlay_masks(image, masks, boxes)], f"{item_id} rejected at {stage}: {'; '.join(reasons)[:90]}"
