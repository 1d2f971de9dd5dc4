"""The in-sequence base (`InSequenceFamily`, `InSequenceDenoiser`): one `SequenceLayout` from
encoding to the capture, the target's prediction cut by that layout, and the LoRA target matcher."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")

from mosaic_kit.attention import RefTargetCapture  # noqa: E402
from mosaic_kit.correspondence import Correspondences  # noqa: E402
from mosaic_kit.models.flux2 import Flux2Family  # noqa: E402
from mosaic_kit.models.insequence import (  # noqa: E402
    InSequenceDenoiser,
    InSequenceFamily,
    SequenceLayout,
    linear_modules_matching,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def family():
    return Flux2Family.tiny(seed=1, max_sequence_length=8)


def test_flux2_is_an_in_sequence_family(family):
    assert isinstance(family, InSequenceFamily) and isinstance(family.model, InSequenceDenoiser)


def test_one_sequence_layout_goes_from_encoding_to_the_capture(family):
    """The layout the capture processors get is the very object the encoding built (not one
    rebuilt from token counts flattened into the forward's arguments)."""
    inputs = family.encode(torch.rand(1, 3, 32, 32), ["a"], torch.rand(1, 2, 3, 16, 16))
    layout = inputs.conditioning["sequence_layout"]
    assert isinstance(layout, SequenceLayout) and layout.ref_index.tolist() == [[4, 5]]
    kwargs = family.model_kwargs(inputs, inputs.target, torch.tensor([0.5]))
    assert kwargs["sequence_layout"] is layout
    assert not {"tgt_tokens", "ref_tokens"} & set(kwargs)
    handle = family.capture_handle()
    seen = []
    original = handle.set_capture
    handle.set_capture = lambda capture, given: (seen.append(given), original(capture, given))[1]
    try:
        corr = Correspondences.from_dicts([[{0: 1}, {0: 2}]], ref_tokens=[1, 1], tgt_tokens=4)
        with torch.no_grad():
            family.model(**kwargs, capture=RefTargetCapture(corr))
    finally:
        del handle.set_capture
    assert seen == [layout]


def test_no_references_means_no_layout_and_the_whole_output(family):
    inputs = family.encode(torch.rand(1, 3, 32, 32), ["a"])
    assert inputs.conditioning["sequence_layout"] is None
    kwargs = family.model_kwargs(inputs, inputs.target, torch.tensor([0.5]))
    with torch.no_grad():
        assert family.model(**kwargs).shape == (1, 4, 16)
    with pytest.raises(ValueError, match="sequence_layout"):
        family.model(**kwargs, capture=RefTargetCapture(
            Correspondences.from_dicts([[{0: 0}]], ref_tokens=[1], tgt_tokens=4)))


class _Echo(nn.Module):
    """A stand-in transformer that returns its input (the cut is what is tested)."""

    def forward(self, hidden_states, return_dict=False):
        return (hidden_states,)


@pytest.mark.parametrize("layout, expected", [
    (SequenceLayout.concatenated(2, [1]), [[0, 1], [10, 11]]),                            # target first: a cut
    (SequenceLayout(torch.tensor([[1, 2]]), torch.tensor([[0]]), (1,), 3), [[1, 2], [11, 12]]),  # target after a ref
    (SequenceLayout.stack([SequenceLayout.concatenated(2, [1]),
                           SequenceLayout(torch.tensor([[1, 2]]), torch.tensor([[0]]), (1,), 3)]), [[0, 1], [11, 12]]),
])
def test_the_prediction_is_the_target_tokens_the_layout_names(layout, expected):
    model = InSequenceDenoiser.__new__(InSequenceDenoiser)
    nn.Module.__init__(model)
    model.transformer = _Echo()
    hidden = torch.tensor([[0.0, 1, 2], [10, 11, 12]])[..., None]
    assert model(sequence_layout=layout, hidden_states=hidden)[..., 0].tolist() == expected


def test_linear_modules_matching_and_its_errors():
    model = nn.ModuleDict({"attn": nn.ModuleDict({"to_q": nn.Linear(2, 2), "to_out": nn.ModuleList([nn.Linear(2, 2)])})})
    assert linear_modules_matching(model, ["to_q", "to_out.0"]) == ["attn.to_q", "attn.to_out.0"]
    with pytest.raises(ValueError, match="targets"):
        linear_modules_matching(model, "to_q")
    with pytest.raises(ValueError, match="none matched"):
        linear_modules_matching(model, ["to_k"])
    with pytest.raises(ValueError, match="capture_blocks"):
        InSequenceDenoiser(model, "some")
