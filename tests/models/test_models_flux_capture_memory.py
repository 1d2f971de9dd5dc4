"""FLUX.1 feeds its capture inside the checkpointed block: under gradient checkpointing the
reference queries and target keys are freed after each block and recomputed in backward, with
the same losses and gradients."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402

from mosaic_kit.attention import PointAttentionRows, RefTargetCapture  # noqa: E402
from mosaic_kit.correspondence import Correspondences  # noqa: E402
from mosaic_kit.models import MosaicFluxTransformer, add_reference_lora  # noqa: E402
from mosaic_kit.models.testing import random_packed_inputs, tiny_flux_transformer  # noqa: E402


class RecordingCapture(RefTargetCapture):
    """A `RefTargetCapture` that keeps weak references to the storages of what it is fed in the
    forward (never the tensors themselves)."""

    def __init__(self, corr, **kwargs):
        super().__init__(corr, **kwargs)
        self.fed = []

    def add(self, query, key):
        if torch._C._current_graph_task_id() == -1:  # not a checkpoint's recomputation
            self.fed.append((StorageWeakRef(query.untyped_storage()), StorageWeakRef(key.untyped_storage())))
        super().add(query, key)


def _model(capture_blocks="double"):
    transformer = tiny_flux_transformer(seed=0)
    add_reference_lora(transformer, rank=4)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return MosaicFluxTransformer(transformer.double(), capture_blocks=capture_blocks)


CORR = Correspondences.from_dicts([[{0: 1, 3: 2}, {1: 0, 2: 3}]], ref_tokens=[4, 4], tgt_tokens=4)


@pytest.mark.parametrize("capture_blocks", ["double", "all"])
def test_checkpointed_blocks_free_the_captured_queries_and_keys(capture_blocks):
    model = _model(capture_blocks)
    model.transformer.enable_gradient_checkpointing()
    inputs = random_packed_inputs(model.transformer, reference_sizes=[(32, 32), (32, 32)], dtype=torch.float64)
    capture = RecordingCapture(CORR, aggregate="all")
    out = model(**inputs, capture=capture)
    assert len(capture.fed) == (2 if capture_blocks == "double" else 4)
    alive = [i for i, (q, k) in enumerate(capture.fed) if not (q.expired() and k.expired())]
    assert alive == [], f"blocks {alive} keep their captured reference queries or target keys until the loss"
    loss = out.square().mean() - capture.result().pair_log_probs.sum() + capture.result().ref_rows.square().sum()
    loss.backward()
    assert capture.num_blocks == len(capture.fed)  # the recomputation did not count twice


def test_feeding_inside_the_block_keeps_losses_and_gradients():
    """Checkpointed and plain runs agree (float64) with the capture and a diagnostic fed together."""

    def run(checkpointing):
        model = _model("all")
        if checkpointing:
            model.transformer.enable_gradient_checkpointing()
        inputs = random_packed_inputs(model.transformer, reference_sizes=[(32, 32), (32, 32)], dtype=torch.float64)
        capture, rows = RefTargetCapture(CORR, aggregate="all"), PointAttentionRows(CORR)
        out = model(**inputs, capture=[capture, rows])
        result = capture.result()
        loss = out.square().mean() - result.pair_log_probs.sum() + result.ref_rows.square().sum()
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), rows.result(), grads

    plain, checkpointed = run(False), run(True)
    torch.testing.assert_close(checkpointed[0], plain[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(checkpointed[1], plain[1], rtol=1e-12, atol=0)
    assert plain[2].keys() == checkpointed[2].keys() and plain[2]
    for name in plain[2]:
        torch.testing.assert_close(checkpointed[2][name], plain[2][name], rtol=1e-9, atol=1e-12)
