"""Where the target and each reference sit in a joint image sequence (`SequenceLayout`), and the
gather that turns a block's joint queries and keys into what `RefTargetCapture.add` takes. Pure
torch: no diffusers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ...correspondence import Correspondences
from ...utils.checks import check_int

__all__ = ["SequenceLayout"]


def _check_index(name: str, index: object) -> torch.Tensor:
    if not isinstance(index, torch.Tensor) or index.dtype != torch.long or index.dim() != 2:
        got = f"{index.dtype} tensor of shape {tuple(index.shape)}" if isinstance(index, torch.Tensor) else type(index).__name__
        raise ValueError(f"Expected `{name}` to be a (B or 1, N) torch.long tensor, but got {got}.")
    return index


def _box_indices(canvas_cols: int, box: Sequence[int], name: str, canvas_rows: int) -> torch.Tensor:
    if len(box) != 4:
        raise ValueError(f"Expected `{name}` as (top, left, rows, cols) in tokens, but got {tuple(box)!r}.")
    top, left, rows, cols = (check_int(name, v, minimum=0) for v in box)
    if rows < 1 or cols < 1 or top + rows > canvas_rows or left + cols > canvas_cols:
        raise ValueError(
            f"Expected `{name}` = (top, left, rows, cols) with rows, cols >= 1 inside the "
            f"{canvas_rows}x{canvas_cols} token canvas, but got {tuple(box)!r}."
        )
    r = torch.arange(top, top + rows)[:, None]
    c = torch.arange(left, left + cols)[None, :]
    return (r * canvas_cols + c).flatten()


@dataclass(frozen=True, eq=False)
class SequenceLayout:
    """Where the target and each reference sit in the image part of a joint token sequence.

    Positions count image tokens only, in the order the model's image stream holds them (the
    ``hidden_states`` the transformer gets, after patchification); the processors add the text
    offset of their own joint sequence (FLUX, FLUX.2 and Qwen-Image put text first inside
    attention, SD3 puts it last). Token ``i`` of the target (or of reference ``k``) is the
    ``i``-th entry of its index list, so the lists must follow the row-major order that
    `mosaic_kit.correspondence.TokenGrid` and the `Correspondences` use.

    A layout shared by the whole batch has index tensors with a leading dimension of 1; a batch
    whose samples differ (references at other positions, a padded placeholder reference) stacks
    one row per sample (`stack`). The token counts per slot are shared, as in `Correspondences`:
    an absent reference still occupies its slot (a placeholder image) and is marked absent there.

    Args:
        target_index: ``(1 or B, N_tgt)`` long, image-stream positions of the target tokens.
        ref_index: ``(1 or B, N_ref_total)`` long, image-stream positions of the reference tokens,
            the K references concatenated in slot order.
        ref_tokens: ``N^(k)``, the token count of each reference slot (sums to ``N_ref_total``).
        image_tokens: length of the image stream (every position is below it).

    Example:
        >>> layout = SequenceLayout.concatenated(tgt_tokens=4, ref_tokens=[2, 3])  # [target | ref1 | ref2]
        >>> layout.ref_index, layout.image_tokens
        (tensor([[4, 5, 6, 7, 8]]), 9)
        >>> query = torch.arange(9.0).view(1, 9, 1, 1)  # (B, S, H, D), S = the image stream
        >>> ref_query, tgt_key = layout.split(query, query, image_offset=0, seq_dim=1)
        >>> ref_query.flatten().tolist(), tgt_key.flatten().tolist()
        ([4.0, 5.0, 6.0, 7.0, 8.0], [0.0, 1.0, 2.0, 3.0])
    """

    target_index: torch.Tensor
    ref_index: torch.Tensor
    ref_tokens: tuple[int, ...]
    image_tokens: int

    def __post_init__(self) -> None:
        target = _check_index("target_index", self.target_index).cpu()
        refs = _check_index("ref_index", self.ref_index).cpu()
        object.__setattr__(self, "target_index", target)
        object.__setattr__(self, "ref_index", refs)
        ref_tokens = tuple(check_int("ref_tokens[k]", n, minimum=1) for n in self.ref_tokens)
        if not ref_tokens:
            raise ValueError("Expected `ref_tokens` with at least one reference, but got none.")
        object.__setattr__(self, "ref_tokens", ref_tokens)
        object.__setattr__(self, "image_tokens", check_int("image_tokens", self.image_tokens, minimum=1))
        if target.shape[0] != refs.shape[0]:
            raise ValueError(
                f"Expected `target_index` and `ref_index` with one leading size (1 or B), but got "
                f"{target.shape[0]} and {refs.shape[0]}."
            )
        if refs.shape[1] != sum(ref_tokens):
            raise ValueError(
                f"Expected `ref_index` with sum(ref_tokens) = {sum(ref_tokens)} columns, but got {refs.shape[1]}."
            )
        if target.shape[1] < 1:
            raise ValueError("Expected `target_index` with at least one target token, but got none.")
        both = torch.cat([target, refs], dim=1)
        if bool((both < 0).any() | (both >= self.image_tokens).any()):
            raise ValueError(
                f"Expected every position in [0, image_tokens) = [0, {self.image_tokens}), but got values in "
                f"[{int(both.min())}, {int(both.max())}]."
            )
        if bool((both.sort(dim=1).values.diff(dim=1) == 0).any()):
            raise ValueError("Expected every image position used once per sample (target and references disjoint), but got repeats.")
        # where a shared index is one contiguous run, its start (the gather is then a view); decided
        # here, once, so that the gather has no data-dependent branch (dynamo traces it as is)
        starts = {}
        for which, index in (("target", target), ("ref", refs)):
            first = int(index[0, 0])
            contiguous = index.shape[0] == 1 and torch.equal(index[0], torch.arange(first, first + index.shape[1]))
            starts[which] = first if contiguous else None
        object.__setattr__(self, "_starts", starts)
        object.__setattr__(self, "_on_device", {})

    # -- constructors -------------------------------------------------------------------------------
    @classmethod
    def concatenated(
        cls, tgt_tokens: int, ref_tokens: Sequence[int], image_tokens: int | None = None
    ) -> SequenceLayout:
        """The Kontext / FLUX.2 / Qwen-Image-Edit layout: ``[target | ref 1 | ... | ref K]``.

        Args:
            tgt_tokens: N_tgt.
            ref_tokens: N^(k) per reference, in slot order.
            image_tokens: image-stream length; default ``N_tgt + sum(ref_tokens)`` (give more when
                further image tokens follow, e.g. a control image).

        Returns:
            A layout shared by the batch.

        Example:
            >>> SequenceLayout.concatenated(16, [4, 4]).target_index.shape
            torch.Size([1, 16])
        """
        tgt_tokens = check_int("tgt_tokens", tgt_tokens, minimum=1)
        total = tgt_tokens + sum(check_int("ref_tokens[k]", n, minimum=1) for n in ref_tokens)
        return cls(
            target_index=torch.arange(tgt_tokens)[None],
            ref_index=torch.arange(tgt_tokens, total)[None],
            ref_tokens=tuple(ref_tokens),
            image_tokens=total if image_tokens is None else image_tokens,
        )

    @classmethod
    def from_canvas(
        cls, canvas: tuple[int, int], target: Sequence[int], references: Sequence[Sequence[int]]
    ) -> SequenceLayout:
        """The in-context (canvas) layout: target and references tiled in one image, e.g. side by side.

        This is how a model whose forward takes one latent image (SD3, most UNet-free DiTs
        without a reference input) sees references with no change to its forward: concatenate
        the latents along the width (or height) and patchify as usual.

        Args:
            canvas: ``(rows, cols)`` of the token grid of the whole canvas.
            target: ``(top, left, rows, cols)`` of the target's box, in tokens.
            references: one ``(top, left, rows, cols)`` box per reference, in slot order.

        Returns:
            A layout shared by the batch; ``image_tokens = rows * cols``.

        Example:
            >>> layout = SequenceLayout.from_canvas((2, 6), target=(0, 0, 2, 2), references=[(0, 2, 2, 2), (0, 4, 2, 2)])
            >>> layout.target_index, layout.ref_index
            (tensor([[0, 1, 6, 7]]), tensor([[ 2,  3,  8,  9,  4,  5, 10, 11]]))
        """
        if len(canvas) != 2:
            raise ValueError(f"Expected `canvas` as (rows, cols) in tokens, but got {tuple(canvas)!r}.")
        rows, cols = (check_int("canvas", v, minimum=1) for v in canvas)
        target_index = _box_indices(cols, target, "target", rows)
        ref_boxes = [_box_indices(cols, box, f"references[{k}]", rows) for k, box in enumerate(references)]
        if not ref_boxes:
            raise ValueError("Expected `references` with at least one box, but got none.")
        return cls(
            target_index=target_index[None],
            ref_index=torch.cat(ref_boxes)[None],
            ref_tokens=tuple(len(b) for b in ref_boxes),
            image_tokens=rows * cols,
        )

    @classmethod
    def stack(cls, layouts: Sequence[SequenceLayout]) -> SequenceLayout:
        """One layout per sample, for a batch whose samples place their tokens differently.

        Args:
            layouts: B shared layouts with equal ``ref_tokens``, N_tgt and ``image_tokens``.

        Returns:
            A per-sample layout (index tensors with leading size B).

        Example:
            >>> a = SequenceLayout.concatenated(2, [1, 1])            # [t t r1 r2]
            >>> b = SequenceLayout(torch.tensor([[2, 3]]), torch.tensor([[0, 1]]), (1, 1), 4)  # [r1 r2 t t]
            >>> SequenceLayout.stack([a, b]).ref_index
            tensor([[2, 3],
                    [0, 1]])
        """
        if not layouts or not all(isinstance(x, SequenceLayout) for x in layouts):
            raise ValueError("Expected `layouts` to be a non-empty sequence of SequenceLayout.")
        first = layouts[0]
        for i, x in enumerate(layouts):
            if x.target_index.shape[0] != 1:
                raise ValueError(f"Expected shared layouts (leading size 1), but layouts[{i}] has {x.target_index.shape[0]}.")
            if (x.ref_tokens, x.tgt_tokens, x.image_tokens) != (first.ref_tokens, first.tgt_tokens, first.image_tokens):
                raise ValueError(
                    f"Expected every layout with (ref_tokens, N_tgt, image_tokens) = "
                    f"{(first.ref_tokens, first.tgt_tokens, first.image_tokens)}, but layouts[{i}] has "
                    f"{(x.ref_tokens, x.tgt_tokens, x.image_tokens)}."
                )
        return cls(
            target_index=torch.cat([x.target_index for x in layouts]),
            ref_index=torch.cat([x.ref_index for x in layouts]),
            ref_tokens=first.ref_tokens,
            image_tokens=first.image_tokens,
        )

    # -- properties -----------------------------------------------------------------------------------
    @property
    def tgt_tokens(self) -> int:
        """N_tgt, the number of target tokens."""
        return self.target_index.shape[1]

    @property
    def shared(self) -> bool:
        """True when one layout serves every sample of the batch."""
        return self.target_index.shape[0] == 1

    @property
    def target_start(self) -> int | None:
        """Where the target's tokens start when they are one contiguous run of a shared layout
        (their gather is then a slice), else None; decided at construction, so reading it needs
        no tensor value (compiled and fake-tensor runs read it too).

        Example:
            >>> SequenceLayout.concatenated(4, [2, 3]).target_start
            0
        """
        return self._starts["target"]

    def check(self, corr: Correspondences) -> None:
        """Raises `ValueError` unless the layout has the token counts (and batch) of ``corr``.

        Example:
            >>> corr = Correspondences.from_dicts([[{0: 1}, {0: 2}]], ref_tokens=[2, 3], tgt_tokens=4)
            >>> SequenceLayout.concatenated(4, [2, 3]).check(corr)  # passes silently
        """
        if (self.ref_tokens, self.tgt_tokens) != (corr.ref_tokens, corr.tgt_tokens):
            raise ValueError(
                f"Expected a layout with the correspondences' (ref_tokens, tgt_tokens) = "
                f"{(corr.ref_tokens, corr.tgt_tokens)}, but got {(self.ref_tokens, self.tgt_tokens)}."
            )
        if not self.shared and self.target_index.shape[0] != corr.batch_size:
            raise ValueError(
                f"Expected a per-sample layout with B = {corr.batch_size} rows, but got {self.target_index.shape[0]}."
            )

    # -- the gather ---------------------------------------------------------------------------------
    def _take(self, x: torch.Tensor, which: str, offset: int, seq_dim: int) -> torch.Tensor:
        """``x``'s tokens of the target (``which="target"``) or the references (``"ref"``) on
        ``seq_dim``, shifted by ``offset``: a view for a shared contiguous run, ``index_select`` for
        a shared layout, ``gather`` per sample otherwise (indices cached per device, so a training
        step moves nothing to the device after the first)."""
        index = self.target_index if which == "target" else self.ref_index
        count = index.shape[1]
        start = self._starts[which]
        if start is not None:
            return x.narrow(seq_dim, start + offset, count)
        key = (which, x.device)
        if key not in self._on_device:
            self._on_device[key] = index.to(x.device)
        positions = self._on_device[key] + offset
        if self.shared:
            return x.index_select(seq_dim, positions[0])
        if x.shape[0] != positions.shape[0]:
            raise ValueError(f"Expected a batch of {positions.shape[0]} samples (the layout's B), but got {x.shape[0]}.")
        view = [positions.shape[0], 1, 1, 1]
        view[seq_dim] = count
        expanded = list(x.shape)
        expanded[seq_dim] = count
        return x.gather(seq_dim, positions.view(view).expand(expanded))

    def split(
        self, query: torch.Tensor, key: torch.Tensor, image_offset: int, seq_dim: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference queries and target keys of one block, as `RefTargetCapture.add` takes them.

        Args:
            query: ``(B, S, H, D)`` (``seq_dim=1``) or ``(B, H, S, D)`` (``seq_dim=2``) post-RoPE
                queries of a joint sequence whose image stream starts at ``image_offset``.
            key: the keys, shaped as ``query``.
            image_offset: position of the first image token in the joint sequence.
            seq_dim: 1 or 2, the sequence dimension of ``query`` and ``key``.

        Returns:
            ``(B, H, N_ref_total, D)`` reference queries and ``(B, H, N_tgt, D)`` target keys.
        """
        if seq_dim not in (1, 2):
            raise ValueError(f"Expected `seq_dim` to be 1 or 2, but got {seq_dim!r}.")
        for name, x in (("query", query), ("key", key)):
            if x.dim() != 4 or x.shape[seq_dim] < image_offset + self.image_tokens:
                raise ValueError(
                    f"Expected `{name}` 4-D with at least image_offset + image_tokens = "
                    f"{image_offset + self.image_tokens} tokens on dim {seq_dim}, but got shape {tuple(x.shape)}."
                )
        ref_query = self._take(query, "ref", image_offset, seq_dim)
        tgt_key = self._take(key, "target", image_offset, seq_dim)
        if seq_dim == 1:
            ref_query, tgt_key = ref_query.transpose(1, 2), tgt_key.transpose(1, 2)
        return ref_query, tgt_key
