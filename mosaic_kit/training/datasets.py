"""The data set a training config names (the trainer builds its loader around it)."""

from __future__ import annotations

from torch.utils.data import Dataset

from .config import TrainConfig


def build_dataset(config: TrainConfig, validation: bool = False) -> Dataset:
    """The dataset a config names: the synthetic world (held-out identities for validation), the
    released layout or a manifest, optionally through the multi-subject composer.

    Args:
        config: the resolved `TrainConfig` (its ``data`` section).
        validation: the held-out split (synthetic data: another seed, and held-out identities
            unless ``data.synthetic_validation`` is ``seen``).

    Returns:
        A map-style dataset of `mosaic_kit.data.MultiSubjectSample`.

    Example:
        >>> from mosaic_kit.training import config_from_dict
        >>> config = config_from_dict({"data": {"target_size": 64, "ref_size": 32, "synthetic_length": 3}})
        >>> len(build_dataset(config)), len(build_dataset(config, validation=True))
        (3, 3)
    """
    from .. import data

    cfg = config.data
    if cfg.kind == "synthetic":
        world = {"identity_range": data.TRAIN_IDENTITIES, **cfg.synthetic_world}
        if validation and cfg.synthetic_validation == "held_out":
            world["identity_range"] = data.HELD_OUT_IDENTITIES
        world_cfg = data.SyntheticWorldConfig(
            image_size=cfg.target_size, ref_size=cfg.ref_size, min_refs=cfg.synthetic_refs[0],
            max_refs=cfg.synthetic_refs[1], seed=cfg.seed + (1 if validation else 0), **world,
        )
        return data.SyntheticDataset(data.SyntheticWorld(world_cfg), cfg.synthetic_length)
    if cfg.kind == "released":
        base = data.ReleasedDataset(cfg.root, target_size=cfg.target_size, ref_size=cfg.ref_size)
    else:
        base = data.ManifestDataset(cfg.root)
    if cfg.compose:
        return data.ComposedDataset(base, num_subjects=tuple(cfg.compose), canvas_size=cfg.target_size, seed=cfg.seed)
    return base
