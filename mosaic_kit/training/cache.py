"""Cached conditioning: the frozen encoders' outputs of a training data set, computed once.

`build_conditioning_cache` (what ``recipes/cache_conditioning.py`` runs) reads a *training*
config, builds its model family with the encoders and, for every item of its data set, stores what
``family.encode_batch`` computes before the noise: the text encoders' outputs
(`mosaic_kit.models.ModelFamily.encode_prompt_items`: embeddings, pooled embeddings, text ids;
for a family whose prompt shows the references, `prompt_uses_references`, the empty prompt with the
item's references too) and the VAE's packed tokens of the target and of each reference
(`ModelFamily.encode_image_tokens`, one autoencoder call per image, so an image encodes the same
alone or in a batch). Stored once: the empty prompt (caption dropout) and a black reference (a
padded or dropped reference slot).

Layout of ``data.cache_dir``:

- ``index.json``: format, identity (model: family, base or tiny seed/overrides/pixel space,
  dtype; resolution: target and reference size; data: the manifest's path and sha256, or the
  synthetic world's settings), item count, items per shard, shard count;
- ``common.safetensors`` + ``common.json``: the empty prompt and the black reference, with the
  file's sha256;
- ``shard-NNNNN.safetensors`` + ``shard-NNNNN.json``: items ``[N·S, (N+1)·S)``; the sidecar holds
  the shard's sha256 and byte count, and per item its index, sample id, caption and reference count
  (bad samples, which training skips too, are listed apart).

Every file is written to a temporary name and renamed, the sidecar after its shard, so nothing half
written is ever visible; a shard whose sidecar is missing or whose bytes differ from its digest is
redone, a verified one is skipped (resume); ``shard=(i, n)`` takes shards ``i, i + n, …`` (one
machine of n).

`ConditioningCache` is the training side (``data.cache_dir``): it refuses a cache built for
another model, resolution or data set with one message naming what differs (old → new), checks a
shard's digest when it first reads it, and turns a `mosaic_kit.data.MosaicBatch` (after caption
and reference dropout) into the family's `ModelInputs` through
`ModelFamily.encoded_inputs` without any encoder: bit for bit what ``family.encode_batch`` gives.

Example (a tiny FLUX.2 on three synthetic items):

    >>> import tempfile
    >>> from mosaic_kit.training import config_from_dict
    >>> folder = tempfile.mkdtemp()
    >>> config = config_from_dict({"model": {"family": "flux2"}, "mixed_precision": "no", "data": {
    ...     "target_size": 32, "ref_size": 64, "synthetic_length": 3, "cache_dir": folder}})
    >>> build_conditioning_cache(config, progress=False)["written"]
    [0]
    >>> cache = ConditioningCache(folder, cache_identity(config))
    >>> len(cache), cache.bad_items
    (3, [])
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from ..models import ModelFamily, ModelInputs
from ..utils.atomic import atomic_write, write_text_atomic
from .config import TrainConfig

__all__ = ["CACHE_FORMAT", "CacheMismatchError", "ConditioningCache", "ITEMS_PER_SHARD", "build_conditioning_cache",
           "cache_identity", "check_cache_config", "open_training_cache"]

log = logging.getLogger("mosaic_kit.training")

CACHE_FORMAT = 1
"""Version of the cache layout (``index.json``'s ``format``)."""

ITEMS_PER_SHARD = 64
"""Items per shard file by default."""

_INDEX, _COMMON = "index.json", "common"
_DTYPES = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}


class CacheMismatchError(ValueError):
    """A conditioning cache built for another model, resolution or data set (the message says which)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _base_identity(base: str | None) -> str | None:
    if base is None:
        return None
    return str(Path(base).resolve()) if Path(base).exists() else str(base)


def cache_identity(config: TrainConfig) -> dict[str, dict]:
    """What a cache was built for: ``{"model", "resolution", "data"}`` (compared key by key).

    Args:
        config: the training config.

    Returns:
        ``model``: family, base (a local folder resolved, or a hub id), dtype (of
        ``mixed_precision``) and, without a base, the tiny seed, overrides and pixel space;
        ``resolution``: target and reference size (and ``max_refs`` for a family whose prompt shows
        the references); ``data``: the kind and, for a manifest, its sha256 (its path is informative
        only), for the released layout its folder, for synthetic data the world's settings; the
        composer's settings when it composes.

    Example:
        >>> from mosaic_kit.training import config_from_dict
        >>> cache_identity(config_from_dict({"data": {"target_size": 64, "ref_size": 32}}))["resolution"]
        {'target_size': 64, 'ref_size': 32}
    """
    from ..pipelines.registry import get_family

    m, d = config.model, config.data
    model = {"family": m.family, "base": _base_identity(m.base), "dtype": _DTYPES[config.mixed_precision]}
    if m.base is None:
        model.update(tiny_seed=m.tiny_seed, tiny_overrides=dict(m.tiny_overrides), pixel_space=m.pixel_space)
    resolution = {"target_size": d.target_size, "ref_size": d.ref_size}
    if get_family(m.family).family_class.prompt_uses_references:
        resolution["max_refs"] = d.max_refs
    data: dict[str, Any] = {"kind": d.kind}
    if d.kind == "manifest":
        path = Path(d.root)
        if not path.is_file():
            raise ValueError(f"Expected `data.root` to be the manifest .jsonl file, but {str(path)!r} is not a file.")
        data["sha256"] = _sha256(path)
    elif d.kind == "released":
        data["root"] = str(Path(d.root).resolve())
    else:
        data.update(seed=d.seed, synthetic_refs=list(d.synthetic_refs), synthetic_length=d.synthetic_length)
    if d.compose:
        data.update(compose=list(d.compose), seed=d.seed)
    return {"model": model, "resolution": resolution, "data": data}


def _describe_mismatch(old: dict, new: dict) -> str | None:
    names = {"model": "model", "resolution": "resolution", "data": "data set (manifest)"}
    for section in ("model", "resolution", "data"):
        before, after = old.get(section, {}), new.get(section, {})
        changed = [f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
                   for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]
        if changed:
            return f"another {names[section]} ({'; '.join(changed)})"
    return None


def check_cache_config(config: TrainConfig) -> None:
    """Refuses settings a conditioning cache cannot reproduce, naming the setting.

    A family whose prompt shows the references (`ModelFamily.prompt_uses_references`) encodes a
    prompt per set of references: reference dropout (black references in the prompt) is refused,
    and so are batches whose padded K depends on their other samples (``data.max_refs`` null with
    ``data.batch_size`` above 1). The data sets have no random per-step augmentation (the composer
    is seeded per item), so nothing else differs.

    Raises:
        ValueError: naming the setting and why.
    """
    from ..pipelines.registry import get_family

    family = get_family(config.model.family).family_class
    data = config.data
    if family.prompt_uses_references:
        if data.image_dropout:
            raise ValueError(f"Expected `data.image_dropout: 0` with `data.cache_dir` for the {family.name} family, but "
                             f"got {data.image_dropout}: its prompt shows the references, so dropped (black) "
                             "references change the prompt embedding, which the cache does not hold.")
        if data.max_refs is None and data.batch_size > 1:
            raise ValueError(f"Expected `data.max_refs` (a fixed K) or `data.batch_size: 1` with `data.cache_dir` for "
                             f"the {family.name} family: its prompt shows every reference slot, padding included, so "
                             "a prompt cached alone would differ from one padded to its batch's largest K.")


def _clean(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().to("cpu").contiguous().clone() for key, value in tensors.items()}


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Writes atomically; returns the file's sha256."""
    from safetensors.torch import save

    data = save(_clean(tensors), metadata={"format": str(CACHE_FORMAT)})
    atomic_write(path, lambda handle: handle.write(data))
    return hashlib.sha256(data).hexdigest()


def _verified(folder: Path, name: str) -> dict | None:
    """The sidecar of ``name`` when it exists and the file's bytes match its digest, else None."""
    sidecar, tensors = folder / f"{name}.json", folder / f"{name}.safetensors"
    if not sidecar.is_file() or not tensors.is_file():
        return None
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("bytes") != tensors.stat().st_size or meta.get("sha256") != _sha256(tensors):
        return None
    return meta


def _encoding_family(config: TrainConfig) -> ModelFamily:
    """The run's family with its encoders, in the run's dtype; only the encoders go onto the device
    (the transformer, unused here, stays on the CPU): `mosaic_kit.models.encoders` offload, entered
    once around the whole build."""
    from ..models.encoders import enable_encoder_offload
    from ..pipelines.registry import get_family

    m = config.model
    dtype = getattr(torch, _DTYPES[config.mixed_precision])
    spec = get_family(m.family)
    family = spec.build(m.base, torch_dtype=dtype, seed=m.tiny_seed, tiny_overrides=m.tiny_overrides,
                        pixel_space=m.pixel_space, **{name: getattr(m, name) for name in spec.config_extras})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.cpu_threads is not None and device.type == "cpu":  # as the trainer: kernels pick their sums by threads
        torch.set_num_threads(config.cpu_threads)
    family.to("cpu", None if dtype == torch.float32 else dtype)  # the weights the trainer's `family.to` gives
    enable_encoder_offload(family, device)
    return family


def _prompt_tensors(prefix: str, item: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{name}": value for name, value in item.items()}


def build_conditioning_cache(config: TrainConfig, cache_dir: str | os.PathLike | None = None,
                             shard: tuple[int, int] = (0, 1), progress: bool = True,
                             items_per_shard: int = ITEMS_PER_SHARD) -> dict[str, Any]:
    """Computes and writes the conditioning cache of ``config``'s training data (see the module
    docstring): resumable, sharded over machines, with a progress bar.

    Args:
        config: the training config (model and data sections; ``data.cache_dir`` is the folder
            unless ``cache_dir`` is given).
        cache_dir: the folder, or None for ``data.cache_dir``.
        shard: ``(i, n)``: this machine writes shards ``i, i + n, i + 2n, …``.
        progress: show a tqdm progress bar over this machine's items.
        items_per_shard: items per shard file.

    Returns:
        ``{"cache_dir", "items", "shards", "written", "skipped"}`` (shard numbers of this machine).

    Raises:
        CacheMismatchError: the folder holds a cache of another model, resolution or data set.
        ValueError: no folder, a bad ``shard``, or settings the cache cannot reproduce
            (`check_cache_config`).
    """
    from .datasets import build_dataset

    folder = cache_dir if cache_dir is not None else config.data.cache_dir
    if not folder:
        raise ValueError("Expected a cache folder (`data.cache_dir` or `cache_dir`), but got none.")
    if not (isinstance(shard, tuple) and len(shard) == 2 and all(isinstance(v, int) for v in shard)
            and 0 <= shard[0] < shard[1]):
        raise ValueError(f"Expected `shard` (i, n) with 0 <= i < n, but got {shard!r}.")
    index, count = shard
    if isinstance(items_per_shard, bool) or not isinstance(items_per_shard, int) or items_per_shard < 1:
        raise ValueError(f"Expected `items_per_shard` to be a positive int, but got {items_per_shard!r}.")
    check_cache_config(config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    identity = cache_identity(config)
    dataset = build_dataset(config)
    total = len(dataset)
    shards = max(1, -(-total // items_per_shard))
    header = {"format": CACHE_FORMAT, "identity": identity, "items": total, "items_per_shard": items_per_shard,
              "shards": shards}
    if (folder / _INDEX).is_file():
        old = json.loads((folder / _INDEX).read_text())
        what = _describe_mismatch(old.get("identity", {}), identity)
        if what is None and (old.get("items"), old.get("items_per_shard")) != (total, items_per_shard):
            what = (f"another item count or shard size ({old.get('items')} items, {old.get('items_per_shard')} per "
                    f"shard -> {total}, {items_per_shard})")
        if what is not None:
            raise CacheMismatchError(f"The conditioning cache in {folder} was built for {what}: use another folder "
                                     "or delete this one.")
    else:
        write_text_atomic(folder / _INDEX, json.dumps(header, indent=2))
    mine = list(range(index, shards, count))
    todo = [number for number in mine if _verified(folder, f"shard-{number:05d}") is None]
    need_common = _verified(folder, _COMMON) is None
    summary = {"cache_dir": str(folder), "items": total, "shards": shards, "written": todo,
               "skipped": [n for n in mine if n not in todo]}
    if not todo and not need_common:
        return summary
    from ..models.encoders import encoders_in_use

    family = _encoding_family(config)
    with encoders_in_use(family):  # the encoders on the device for the whole build
        _write_shards(family, config, folder, todo, need_common, dataset, items_per_shard, progress)
    return summary


def _write_shards(family: ModelFamily, config: TrainConfig, folder: Path, todo: list[int], need_common: bool,
                  dataset: Any, items_per_shard: int, progress: bool) -> None:
    from tqdm.auto import tqdm

    from ..data import BadSample, collate_samples

    total = len(dataset)
    d = config.data
    collate = dict(target_size=d.target_size, ref_size=d.ref_size, max_refs=d.max_refs,
                   vae_scale_factor=family.vae_scale_factor)
    if need_common:
        tensors = {"black_reference": family.encode_image_tokens(torch.zeros(1, 3, d.ref_size, d.ref_size))[0]}
        if not family.prompt_uses_references:
            tensors.update(_prompt_tensors("empty_prompt", family.encode_prompt_items([""])[0]))
        digest = _write_safetensors(folder / f"{_COMMON}.safetensors", tensors)
        size = (folder / f"{_COMMON}.safetensors").stat().st_size
        write_text_atomic(folder / f"{_COMMON}.json", json.dumps({"sha256": digest, "bytes": size}))
    bar = tqdm(total=sum(min(items_per_shard, total - n * items_per_shard) for n in todo), desc="caching",
               disable=not progress, dynamic_ncols=True)
    for number in todo:
        tensors, items, bad = {}, [], []
        for position in range(number * items_per_shard, min(total, (number + 1) * items_per_shard)):
            bar.update(1)
            try:
                sample = dataset[position]
            except BadSample as error:  # training skips it too (SkippingLoader)
                bad.append({"index": position, "reason": str(error)})
                continue
            batch = collate_samples([sample], **collate)
            j, present = len(items), int(batch.reference_present[0].sum())
            tensors[f"{j}/target"] = family.encode_image_tokens(batch.targets)[0]
            if present:
                tensors[f"{j}/references"] = family.encode_image_tokens(batch.references[0, :present])
            tensors.update(_prompt_tensors(f"{j}/prompt", family.encode_prompt_items(batch.captions, batch.references)[0]))
            if family.prompt_uses_references:  # the empty prompt shows this item's references
                tensors.update(_prompt_tensors(f"{j}/empty_prompt", family.encode_prompt_items([""], batch.references)[0]))
            items.append({"index": position, "id": sample.sample_id, "caption": sample.caption, "references": present})
        name = f"shard-{number:05d}"
        digest = _write_safetensors(folder / f"{name}.safetensors", tensors)
        size = (folder / f"{name}.safetensors").stat().st_size
        write_text_atomic(folder / f"{name}.json", json.dumps({"sha256": digest, "bytes": size, "items": items,
                                                               "bad": bad}))
    bar.close()


class ConditioningCache:
    """The training side of a conditioning cache (see the module docstring).

    Args:
        folder: the cache folder (``data.cache_dir``).
        identity: what the run needs (`cache_identity` of its config).
        max_open: shard files kept open at once.

    Raises:
        CacheMismatchError: built for another model, resolution or data set (old → new).
        ValueError: no cache there, shards missing (naming them and the recipe), or a sample id
            in two items.
    """

    def __init__(self, folder: str | os.PathLike, identity: dict, max_open: int = 8) -> None:
        self.folder = Path(folder)
        index = self.folder / _INDEX
        if not index.is_file():
            raise ValueError(f"Expected a conditioning cache in `data.cache_dir` {str(self.folder)!r} ({_INDEX}), but "
                             "found none: build it with `python recipes/cache_conditioning.py --config <this config>`.")
        header = json.loads(index.read_text())
        if header.get("format") != CACHE_FORMAT:
            raise CacheMismatchError(f"The conditioning cache in {self.folder} has format {header.get('format')!r}, "
                                     f"this version reads {CACHE_FORMAT}: rebuild it.")
        what = _describe_mismatch(header.get("identity", {}), identity)
        if what is not None:
            raise CacheMismatchError(f"The conditioning cache in {self.folder} was built for {what}: rebuild it with "
                                     "recipes/cache_conditioning.py for this config, or point `data.cache_dir` elsewhere.")
        self.identity, self.max_open = identity, max_open
        self._where: dict[str, tuple[int, int, dict]] = {}
        self.bad_items: list[dict] = []
        missing = []
        for number in range(header["shards"]):
            sidecar = self.folder / f"shard-{number:05d}.json"
            if not sidecar.is_file():
                missing.append(number)
                continue
            meta = json.loads(sidecar.read_text())
            self.bad_items.extend(meta["bad"])
            for j, item in enumerate(meta["items"]):
                if item["id"] in self._where:
                    raise ValueError(f"Expected unique sample ids in the cached data set, but {item['id']!r} is item "
                                     f"{self._where[item['id']][2]['index']} and item {item['index']}.")
                self._where[item["id"]] = (number, j, item)
        if missing or not (self.folder / f"{_COMMON}.json").is_file():
            raise ValueError(f"Expected a complete conditioning cache in {self.folder}, but shards {missing[:8]} "
                             f"({len(missing)} of {header['shards']}) or the common file are missing: finish it with "
                             "recipes/cache_conditioning.py (every --shard i/n).")
        self._open: OrderedDict[str, Any] = OrderedDict()
        common = self._handle(_COMMON)
        self.black_reference = common.get_tensor("black_reference")
        names = [key for key in common.keys() if key.startswith("empty_prompt/")]
        self.empty_prompt = {key.split("/", 1)[1]: common.get_tensor(key) for key in names} or None

    def __len__(self) -> int:
        """Items cached (bad samples not counted)."""
        return len(self._where)

    def _handle(self, name: str) -> Any:
        from safetensors import safe_open

        if name in self._open:
            self._open.move_to_end(name)
            return self._open[name]
        meta = _verified(self.folder, name)
        if meta is None:
            raise ValueError(f"Expected {name}.safetensors in the conditioning cache {self.folder} to match its digest "
                             f"({name}.json), but it does not (damaged or changed): rebuild that shard with "
                             "recipes/cache_conditioning.py (it redoes shards that fail their digest).")
        handle = safe_open(str(self.folder / f"{name}.safetensors"), framework="pt")
        self._open[name] = handle
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return handle

    def item(self, sample_id: str) -> dict[str, Any]:
        """The cached tensors of one sample: ``target`` ``(N_tgt, C)``, ``references``
        ``(K_i, N_ref, C)`` or None, ``prompt`` and (for a family whose prompt shows the references)
        ``empty_prompt`` dicts, plus ``caption`` and ``index``.

        Raises:
            ValueError: the sample id is not in the cache.
        """
        if sample_id not in self._where:
            raise ValueError(f"Expected sample {sample_id!r} in the conditioning cache {self.folder}, but it is not "
                             "there: the data set changed since it was built; rebuild it.")
        number, j, meta = self._where[sample_id]
        handle = self._handle(f"shard-{number:05d}")
        keys = [key for key in handle.keys() if key.startswith(f"{j}/")]

        def prompt(kind: str) -> dict[str, torch.Tensor] | None:
            found = {key.split("/", 2)[2]: handle.get_tensor(key) for key in keys if key.startswith(f"{j}/{kind}/")}
            return found or None

        references = handle.get_tensor(f"{j}/references") if f"{j}/references" in keys else None
        return {"target": handle.get_tensor(f"{j}/target"), "references": references, "prompt": prompt("prompt"),
                "empty_prompt": prompt("empty_prompt"), "caption": meta["caption"], "index": meta["index"]}

    def encode_batch(self, family: ModelFamily, batch: Any) -> ModelInputs:
        """What ``family.encode_batch(batch)`` returns, from the cache (no encoder runs).

        Args:
            family: the run's family (built without encoders).
            batch: a `mosaic_kit.data.MosaicBatch` after `mosaic_kit.data.apply_condition_dropout`:
                a dropped caption takes the cached empty prompt, an absent or dropped reference
                slot the cached black reference.

        Raises:
            ValueError: a sample not cached, or whose caption or reference count differs from the
                cached one (the data changed since).
        """
        family.check_encode_inputs(batch.targets, batch.captions, batch.references,
                                   ("batch.targets", "batch.captions", "batch.references"))
        b, k = batch.references.shape[:2]
        prompts, targets, references = [], [], []
        for i, sample_id in enumerate(batch.sample_ids):
            item = self.item(sample_id)
            if bool(batch.caption_dropped[i]):
                prompts.append(item["empty_prompt"] if family.prompt_uses_references else self.empty_prompt)
            elif batch.captions[i] != item["caption"]:
                raise ValueError(f"Expected the caption of sample {sample_id!r} to be the cached {item['caption']!r}, "
                                 f"but got {batch.captions[i]!r}: the data changed since the cache was built; rebuild it.")
            else:
                prompts.append(item["prompt"])
            targets.append(item["target"])
            count = 0 if item["references"] is None else item["references"].shape[0]
            slots = []
            for slot in range(k):
                if not bool(batch.reference_present[i, slot]):
                    slots.append(self.black_reference)
                elif slot < count:
                    slots.append(item["references"][slot])
                else:
                    raise ValueError(f"Expected at most {count} references of sample {sample_id!r} (cached), but the "
                                     f"batch has reference {slot + 1}: the data changed since; rebuild the cache.")
            if k:
                references.append(torch.stack(slots))
        layout = family.token_layout(tuple(batch.targets.shape[-2:]), [tuple(batch.references.shape[-2:])] * k)
        return family.encoded_inputs(prompts, torch.stack(targets), torch.stack(references) if k else None, layout)


def open_training_cache(config: TrainConfig) -> ConditioningCache | None:
    """The run's `ConditioningCache` (``data.cache_dir``), or None without one; checks the
    settings first (`check_cache_config`)."""
    if not config.data.cache_dir:
        return None
    check_cache_config(config)
    return ConditioningCache(config.data.cache_dir, cache_identity(config))
