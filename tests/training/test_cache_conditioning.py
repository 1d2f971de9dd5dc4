"""Cached conditioning (`mosaic_kit.training.cache`, ``recipes/cache_conditioning.py``): training from
the cache gives the live run's losses bit for bit, never builds the encoders, refuses a cache of
another model / resolution / data set, and the cache build resumes, shards and never shows a half
written file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from mosaic_kit.pipelines.registry import family_names, get_family  # noqa: E402
from mosaic_kit.training import MosaicTrainer, config_from_dict  # noqa: E402
from mosaic_kit.training.cache import (  # noqa: E402
    CacheMismatchError,
    ConditioningCache,
    build_conditioning_cache,
    cache_identity,
)

REPO = Path(__file__).resolve().parents[2]


def _config(out: Path, family: str = "flux2", cache: Path | None = None, base: str | None = None, **data) -> object:
    wide = get_family(family).family_class.min_sample_reference_side > 32  # FLUX.2's pipeline: references >= 64 px
    values = {"target_size": 32, "ref_size": 64 if wide else 32, "batch_size": 2, "synthetic_length": 4,
              "synthetic_refs": [1, 2], "caption_dropout": 0.5, "image_dropout": 0.5,
              "cache_dir": None if cache is None else str(cache)}
    if get_family(family).family_class.prompt_uses_references:  # refused there (check_cache_config)
        values.update(image_dropout=0.0, max_refs=2)
    values.update(data)
    return config_from_dict({
        "output_dir": str(out), "max_steps": 2, "mixed_precision": "no", "log_every": 1, "checkpoint_every": 2,
        "validate_every": 0, "validation_samples": 0, "tracker": None, "ema_decay": None, "cpu_threads": 1,
        "model": {"family": family, "base": base, "lora_rank": 4, "gradient_checkpointing": False}, "data": values})


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train(config) -> list[dict]:
    MosaicTrainer(config, progress=False).train()
    return _records(Path(config.output_dir))


def _assert_same_losses(live: list[dict], cached: list[dict]) -> None:
    assert len(live) == len(cached) == 2
    for a, b in zip(live, cached):
        for key in ("loss", "flow_matching", "scal", "mdl", "grad_norm"):
            assert a[key] == b[key], (key, a[key], b[key])  # bit for bit (float32, one thread)


@pytest.mark.parametrize("family", family_names())
def test_cached_training_gives_the_live_losses_bit_for_bit(tmp_path, family):
    """Every registered family, synthetic data, caption and reference dropout (the cached empty
    prompt and black reference), padded reference slots (K of 1 or 2 in a batch of 2)."""
    cache = tmp_path / "cache"
    summary = build_conditioning_cache(_config(tmp_path / "x", family, cache), progress=False)
    assert summary["items"] == 4 and summary["written"] == [0]
    live = _train(_config(tmp_path / "live", family))
    cached = _train(_config(tmp_path / "cached", family, cache))
    _assert_same_losses(live, cached)


@pytest.mark.parametrize("family", ["flux1", "flux2", "kontext"])
def test_cached_training_on_a_manifest_never_builds_the_encoders(tmp_path, monkeypatch, family):
    """A saved base (what a real run loads): with ``data.cache_dir`` the text encoders and the VAE
    are never constructed (their constructors raise here), and the losses equal the live run's."""
    from mosaic_kit.data import make_manifest_fixture
    from mosaic_kit.pipelines.registry import build_family

    base = tmp_path / "base"
    pipe = build_family(family, seed=0).pipe
    if family == "flux2":  # a saved [klein] base stacks text layers (9, 18, 27): a 28-layer tiny text encoder
        from transformers import Qwen3Config, Qwen3ForCausalLM

        from mosaic_kit.models.flux2.tiny import TINY_FLUX2_TEXT_CONFIG

        text = {**TINY_FLUX2_TEXT_CONFIG, "num_hidden_layers": 28}
        pipe.text_encoder = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(pipe.tokenizer), **text)).eval()
    pipe.save_pretrained(base)
    encoder_classes = {type(getattr(pipe, name)) for name in get_family(family).family_class.encoder_components
                       if isinstance(getattr(pipe, name), torch.nn.Module)}
    manifest = make_manifest_fixture(tmp_path / "data", ["dog", "cat", "owl"], size=64)
    data = {"kind": "manifest", "root": str(manifest)}
    cache = tmp_path / "cache"
    build_conditioning_cache(_config(tmp_path / "x", family, cache, base=str(base), **data), progress=False)
    live = _train(_config(tmp_path / "live", family, base=str(base), **data))

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"{type(self).__name__} constructed during cached training")

    assert len(encoder_classes) >= 2  # a text encoder and a VAE at least
    for cls in encoder_classes:
        monkeypatch.setattr(cls, "__init__", refuse)
    cached = _train(_config(tmp_path / "cached", family, cache, base=str(base), **data))
    _assert_same_losses(live, cached)


def test_a_cache_of_another_model_resolution_or_manifest_is_refused(tmp_path):
    from mosaic_kit.data import make_manifest_fixture

    manifest = make_manifest_fixture(tmp_path / "data", ["dog", "cat"], size=64)
    cache = tmp_path / "cache"
    config = _config(tmp_path / "x", "flux1", cache, kind="manifest", root=str(manifest))
    build_conditioning_cache(config, progress=False)
    ConditioningCache(cache, cache_identity(config))  # the same config opens it

    with pytest.raises(CacheMismatchError, match=r"another resolution \(target_size: 32 -> 64\)"):
        ConditioningCache(cache, cache_identity(_config(tmp_path / "x", "flux1", cache, kind="manifest",
                                                         root=str(manifest), target_size=64)))
    with pytest.raises(CacheMismatchError, match=r"another model \(family: 'flux1' -> 'kontext'\)"):
        ConditioningCache(cache, cache_identity(_config(tmp_path / "x", "kontext", cache, kind="manifest",
                                                         root=str(manifest))))
    manifest.write_text(manifest.read_text().replace("a photo of dog", "a photo of a dog"))
    changed = _config(tmp_path / "x", "flux1", cache, kind="manifest", root=str(manifest))
    with pytest.raises(CacheMismatchError, match=r"another data set \(manifest\) \(sha256: '[0-9a-f]+' -> '[0-9a-f]+'\)"):
        MosaicTrainer(changed, progress=False).setup()  # the trainer refuses it before any step
    with pytest.raises(CacheMismatchError, match="another data set"):
        build_conditioning_cache(changed, progress=False)  # and so does the build (no mixed cache)


def test_the_build_resumes_redoes_a_damaged_shard_and_splits_over_machines(tmp_path, monkeypatch):
    from mosaic_kit.models import Flux2Family

    cache = tmp_path / "cache"
    config = _config(tmp_path / "x", "flux2", cache, synthetic_length=5)
    # machine 1 of 2 first: shards 1 (items 2, 3); then an interrupted machine 0 (dies in shard 2)
    assert build_conditioning_cache(config, shard=(1, 2), progress=False, items_per_shard=2)["written"] == [1]
    calls = {"n": 0}
    original = Flux2Family.encode_image_tokens

    def dies_in_shard_2(self, images):
        calls["n"] += 1
        if calls["n"] > 2 * 2 + 1:  # items 0 and 1 (target, references), item 4's target, then its references
            raise KeyboardInterrupt  # (the common file is machine 1's already)
        return original(self, images)

    monkeypatch.setattr(Flux2Family, "encode_image_tokens", dies_in_shard_2)
    with pytest.raises(KeyboardInterrupt):
        build_conditioning_cache(config, shard=(0, 2), progress=False, items_per_shard=2)
    monkeypatch.undo()
    names = sorted(p.name for p in cache.iterdir())
    assert "shard-00002.safetensors" not in names and "shard-00002.json" not in names  # nothing half written
    assert not any(name.endswith(".safetensors") and not name.startswith(("shard-", "common")) for name in names)
    with pytest.raises(ValueError, match=r"shards \[2\] \(1 of 3\)"):
        ConditioningCache(cache, cache_identity(config))
    again = build_conditioning_cache(config, shard=(0, 2), progress=False, items_per_shard=2)
    assert again["written"] == [2] and again["skipped"] == [0]
    assert len(ConditioningCache(cache, cache_identity(config))) == 5
    # a damaged shard: refused where training reads it, redone by the next build
    shard = cache / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    opened = ConditioningCache(cache, cache_identity(config))
    with pytest.raises(ValueError, match="shard-00001.safetensors .* to match its digest"):
        opened.item("synthetic-0-2")
    assert build_conditioning_cache(config, shard=(1, 2), progress=False, items_per_shard=2)["written"] == [1]
    assert opened.item("synthetic-0-2")["target"].shape[0] == 4  # 32² target: 2×2 tokens


def test_qwen_cache_refuses_what_it_cannot_reproduce(tmp_path):
    with pytest.raises(ValueError, match="data.image_dropout: 0"):
        build_conditioning_cache(_config(tmp_path, "qwen_edit_plus", tmp_path / "c", image_dropout=0.1), progress=False)
    with pytest.raises(ValueError, match="data.max_refs"):
        build_conditioning_cache(_config(tmp_path, "qwen_edit_plus", tmp_path / "c", max_refs=None), progress=False)


def test_cached_training_skips_validation_sheets_with_a_log_line(tmp_path, caplog):
    cache = tmp_path / "cache"
    build_conditioning_cache(_config(tmp_path / "x", "flux2", cache), progress=False)
    config = _config(tmp_path / "run", "flux2", cache)
    config.validation_samples = 1
    with caplog.at_level(logging.WARNING, logger="mosaic_kit.training"):
        MosaicTrainer(config, progress=False).train()
    assert "validation sheets skipped" in caplog.text and "data.cache_dir" in caplog.text
    assert not (tmp_path / "run" / "samples").exists()


def test_cache_recipe_writes_the_index_and_refuses_a_bad_shard(tmp_path, capsys):
    from helpers import load_script

    recipe = load_script("recipes/cache_conditioning.py", "cache_conditioning")
    args = ["--config", str(REPO / "recipes" / "configs" / "tiny_flux2_cpu.yaml"), "--cache-dir", str(tmp_path / "c"),
            "--no-progress", "data.synthetic_length=3", "data.target_size=32"]
    summary = recipe.main(args)
    assert summary["items"] == 3 and json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    assert index["identity"]["model"]["family"] == "flux2" and index["identity"]["resolution"]["target_size"] == 32
    sidecar = json.loads((tmp_path / "c" / "shard-00000.json").read_text())
    assert len(sidecar["sha256"]) == 64 and [item["index"] for item in sidecar["items"]] == [0, 1, 2]
    assert recipe.main(args)["skipped"] == [0]  # verified: nothing redone
    with pytest.raises(SystemExit) as error:
        recipe.main([*args, "--shard", "2/2"])
    assert error.value.code == 2 and "0 <= i < n" in capsys.readouterr().err
