"""Family options (`mosaic_kit.models.options`): declared by the family, checked by name and value,
recorded in the LoRA file, and a LoRA refused by a family built with other values."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from mosaic_kit.models.kontext import KontextFamily  # noqa: E402
from mosaic_kit.models.options import (  # noqa: E402
    FAMILY_OPTIONS_KEY,
    check_family_options,
    recorded_family_options,
    resolve_family_options,
)
from mosaic_kit.pipelines import build_family, family_names, get_family  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_registry_builds_with_declared_options_and_refuses_others():
    assert get_family("kontext").family_options == {"reference_method": ("offset", "index", "uxo")}
    family = build_family("kontext", family_options={"reference_method": "uxo"})
    assert family.reference_method == "uxo" and family.family_option_values() == {"reference_method": "uxo"}
    with pytest.raises(ValueError, match=r"Unknown family option 'method' for model family 'kontext'; "
                                         r"expected among \['reference_method'\]"):
        build_family("kontext", family_options={"method": "index"})
    with pytest.raises(ValueError, match=r"one of \['offset', 'index', 'uxo'\], but got 'side'"):
        get_family("kontext").check_options({"reference_method": "side"})
    for name in family_names():  # a family without the option refuses it, naming itself
        spec = get_family(name)
        if "reference_method" not in spec.family_options:
            with pytest.raises(ValueError, match=f"model family '{name}'; it takes none"):
                spec.check_options({"reference_method": "index"})
    with pytest.raises(ValueError, match="mapping of option names"):
        check_family_options(KontextFamily, ["reference_method"])


def test_lora_records_the_options_and_loads_only_into_a_family_with_them(tmp_path):
    trained = KontextFamily.tiny(reference_method="index")
    trained.add_lora(rank=2)
    file = trained.save_lora(tmp_path)
    assert recorded_family_options(file) == recorded_family_options(tmp_path) == {"reference_method": "index"}
    same = KontextFamily.tiny(reference_method="index")
    same.load_lora(file)
    assert same.transformer.active_adapters() == ["mosaic"]
    with pytest.raises(ValueError, match=r"trained with family options reference_method='index' \(the family: "
                                         r"'offset'\).*family_options \{'reference_method': 'index'\}"):
        KontextFamily.tiny().load_lora(file)
    # inference: the recorded options fill what the user leaves out; a conflicting one is refused
    assert resolve_family_options(KontextFamily, None, tmp_path) == {"reference_method": "index"}
    with pytest.raises(ValueError, match=r"reference_method='index' \(the LoRA .* was trained with it\), but got "
                                         r"reference_method='uxo'"):
        resolve_family_options(KontextFamily, {"reference_method": "uxo"}, file)
    with pytest.raises(ValueError, match="JSON object"):
        recorded_family_options({FAMILY_OPTIONS_KEY: "[1]"})


def test_the_option_changes_what_the_family_feeds_the_model():
    references = torch.rand(1, 2, 3, 16, 16)
    ids = {method: build_family("kontext", family_options={"reference_method": method}).encode(
        torch.rand(1, 3, 32, 32), ["a"], references).conditioning["reference_ids"] for method in ("offset", "index")}
    assert ids["index"][:, 0].tolist() == [1.0, 2.0]  # reference k (one token each) at index k
    assert not torch.equal(ids["offset"], ids["index"])
