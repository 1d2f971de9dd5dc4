"""The stream attention of `MosaicFluxAttnProcessor` (eq. 7), in pure torch.

Text and target queries attend to every key in one call; all reference queries attend in one
batched call (``reference_attention="isolated"``: text, target and their own reference;
``"full"``: everything). References of equal size are folded into the batch; references of
different sizes share one masked call. The diffusers side of the processor (projections, RoPE,
output projections) is in ``_diffusers.py``.

- `ReferenceKVCache`: reference keys and values of every block, for
  `MosaicFluxTransformer.build_reference_cache`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .lora import DEFAULT_ADAPTER


@dataclass
class ReferenceKVCache:
    """Reference keys and values of every block, computed once with references attending only to
    themselves (`MosaicFluxTransformer.build_reference_cache`).

    Attributes:
        keys: per block (double blocks, then single blocks), ``(B, N_ref, H, D)`` post-RoPE keys.
        values: per block, ``(B, N_ref, H, D)`` values.
        reference_token_counts: tokens per reference.
    """

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    reference_token_counts: tuple[int, ...] = ()

    @property
    def batch_size(self) -> int:
        """B of the cached tensors."""
        return self.keys[0].shape[0]


@dataclass
class _Streams:
    """What `MosaicFluxAttnProcessor` needs beyond the stock arguments, for one block call."""

    references: torch.Tensor | None  # (B, N_ref, D_model) normalised reference tokens
    reference_rotary: tuple[torch.Tensor, torch.Tensor] | None
    reference_token_counts: tuple[int, ...]
    text_tokens: int
    reference_attention: str
    # the captures this block feeds, inside the block's function (so that a checkpointed block
    # recomputes its reference queries and target keys in backward instead of keeping them)
    captures: tuple = ()
    cached: tuple[torch.Tensor, torch.Tensor] | None = None  # (keys, values) of the references
    store: tuple[list, list] | None = None  # where a cache build appends (keys, values)
    main_present: bool = True  # False while building a reference cache
    reference_adapter: str = DEFAULT_ADAPTER  # the peft adapter that acts on reference tokens only


@dataclass
class _AttentionOutputs:
    main: torch.Tensor | None  # single blocks: text + target; double blocks: target
    text: torch.Tensor | None  # double blocks only
    references: torch.Tensor | None
    capture_query: torch.Tensor | None  # (B, H, N_ref, D)
    capture_key: torch.Tensor | None  # (B, H, N_tgt, D)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim))



class _StreamAttention:
    """The processor's attention over the streams (mixed into `MosaicFluxAttnProcessor`)."""

    def attend_streams(
        self, attend, q_main, k_main, v_main, q_ref, k_ref, v_ref, mosaic: _Streams
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The attention of one block, ``(B, N, H, D)`` tensors in, ``(B, N, H·D)`` out.

        Text + target queries attend to all keys in one call; all reference queries attend in one
        batched call (see `_reference_attention`). ``q_main`` is None while building a reference
        cache; ``q_ref`` is None without references or with a cache.

        Returns:
            ``(main_out, ref_out)``, each None where its queries are.
        """
        main_out = None
        if q_main is not None:
            keys = k_main if k_ref is None else torch.cat([k_main, k_ref], dim=1)
            values = v_main if v_ref is None else torch.cat([v_main, v_ref], dim=1)
            main_out = attend(q_main, keys, values)
        ref_out = None
        if q_ref is not None:
            ref_out = _reference_attention(
                attend, q_ref, k_ref, v_ref, k_main, v_main, mosaic.reference_token_counts, mosaic.reference_attention
            )
        return main_out, ref_out



def _reference_attention(attend, q_ref, k_ref, v_ref, k_main, v_main, counts, mode):
    """All reference queries in one attention call. ``(B, N, H, D)`` layout throughout."""
    if k_main is None:  # cache build: references attend to themselves only
        shared_k = shared_v = q_ref.new_zeros(q_ref.shape[0], 0, *q_ref.shape[2:])
    else:
        shared_k, shared_v = k_main, v_main
    if mode == "full" and k_main is not None:
        return attend(q_ref, torch.cat([shared_k, k_ref], dim=1), torch.cat([shared_v, v_ref], dim=1))
    batch, heads, dim = q_ref.shape[0], q_ref.shape[2], q_ref.shape[3]
    num_refs = len(counts)
    if len(set(counts)) == 1:  # equal sizes: fold the references into the batch, no mask
        n = counts[0]

        def fold(x):
            return x.reshape(batch * num_refs, n, heads, dim)

        def keys_for(shared, own):
            shared = shared[:, None].expand(-1, num_refs, -1, -1, -1).reshape(batch * num_refs, -1, heads, dim)
            return torch.cat([shared, fold(own)], dim=1)

        out = attend(fold(q_ref), keys_for(shared_k, k_ref), keys_for(shared_v, v_ref))
        return out.reshape(batch, num_refs * n, -1)
    # different sizes: one call over [shared, all references] with a block mask
    owner = torch.repeat_interleave(torch.arange(num_refs, device=q_ref.device), torch.tensor(counts, device=q_ref.device))
    allowed = torch.cat(
        [torch.ones(owner.numel(), shared_k.shape[1], dtype=torch.bool, device=q_ref.device), owner[:, None] == owner[None, :]],
        dim=1,
    )
    return attend(q_ref, torch.cat([shared_k, k_ref], dim=1), torch.cat([shared_v, v_ref], dim=1), allowed[None, None])

