"""The in-sequence capture processors keep nothing alive for the backward that the attention does
not keep anyway: the capture is fed views of the joint query and key that the attention saves,
so MOSAIC's memory overhead stays a few MB at real scale (Qwen-Image-Edit-Plus used to keep each
block's image-stream query and key alive until the block's backward: +0.21 GiB at 20B)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from mosaic_kit.attention import RefTargetCapture  # noqa: E402
from mosaic_kit.correspondence import Correspondences  # noqa: E402
from mosaic_kit.models.flux2 import Flux2Family  # noqa: E402
from mosaic_kit.models.qwen import QwenEditPlusFamily  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _saved_storage_bytes(run) -> int:
    """Bytes of the distinct storages autograd saves for the backward while ``run()`` builds the graph."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


@pytest.mark.parametrize("family_class", [QwenEditPlusFamily, Flux2Family])
def test_capture_saves_no_storage_beyond_the_attentions(family_class):
    torch.manual_seed(0)
    family = family_class.tiny()
    family.add_lora(rank=2, init=False)
    family.set_trainable("lora")
    inputs = family.encode(torch.rand(1, 3, 64, 64), ["a cat"], torch.rand(1, 2, 3, 64, 64))
    layout = inputs.layout
    n_tgt, refs = layout.target_grid.num_tokens, layout.reference_token_counts
    corr = Correspondences.from_dicts([[{0: 1, 3: 2}, {1: 0, 2: 5}]], ref_tokens=list(refs), tgt_tokens=n_tgt)
    noisy, timestep = torch.randn(1, n_tgt, family.token_channels), torch.tensor([0.6])

    plain = _saved_storage_bytes(lambda: family.forward(inputs, noisy, timestep))
    captured = _saved_storage_bytes(lambda: family.forward(inputs, noisy, timestep, capture=RefTargetCapture(corr)))
    transformer = family.transformer
    heads, dim = transformer.config.num_attention_heads, transformer.config.attention_head_dim
    image_stream = (n_tgt + sum(refs)) * heads * dim * 4  # one block's image-stream query, float32
    # the capture's own statistics are a few hundred bytes; one block's query and key of the image
    # stream (what the Qwen processor kept alive before) are 2 × image_stream per block
    assert captured - plain < image_stream / 4, (plain, captured, image_stream)
