"""Bad input to the losses, the correspondences, the image readers, manifests and shards (issue 11).

Each class of bad input gives a clear error (a `ValueError` naming the argument or the file and
line, or a counted `BadSample` inside data loading) or a correct result; never a raw error from
torch, PIL or pyarrow, never a silently wrong value.
"""

import io
import json
import math
import random
import struct
import zlib
from pathlib import Path

import pytest
import torch
from helpers import random_dicts
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from mosaic_kit import finite_checks
from mosaic_kit.correspondence import (
    DISJOINT_POLICIES,
    Correspondences,
    TokenGrid,
    contested_tokens,
    enforce_disjoint,
    find_conflicts,
    is_disjoint,
    load_correspondences,
    load_released_dicts,
    save_correspondences,
    save_released_dicts,
    subsample,
)
from mosaic_kit.data import BadSample, ManifestDataset, SkippingLoader, make_manifest_fixture, read_manifest
from mosaic_kit.data._images import ALPHA_BACKGROUND, MAX_IMAGE_PIXELS, load_mask, load_rgb, to_rgb
from mosaic_kit.data.loader import ResumableSampler
from mosaic_kit.losses import MosaicObjective, flow_matching_loss
from mosaic_kit.losses.functional import mdl, scal

# -- losses given a dense attention map --------------------------------------------------------


@st.composite
def dense_maps(draw, dtypes=(torch.float64, torch.float32, torch.bfloat16, torch.float16)):
    """A random correspondence batch and a valid dense A (rows softmaxed over the targets)."""
    seed = draw(st.integers(0, 2**31 - 1))
    rng = random.Random(seed)
    ref_tokens = [rng.randint(1, 5) for _ in range(draw(st.integers(1, 4)))]
    tgt = rng.randint(2, 9)
    samples = random_dicts(rng, draw(st.integers(1, 3)), ref_tokens, tgt, absent_prob=0.3, empty_prob=0.2)
    corr = Correspondences.from_dicts(samples, ref_tokens, tgt)
    logits = torch.randn(corr.batch_size, corr.total_ref_tokens, tgt, generator=torch.Generator().manual_seed(seed))
    dense = (logits * draw(st.sampled_from([0.1, 1.0, 5.0]))).double().softmax(-1)
    return corr, dense.to(draw(st.sampled_from(dtypes)))


def _present_row(corr: Correspondences, rng: random.Random) -> tuple[int, int] | None:
    rows = [(b, off + u) for b in range(corr.batch_size) for k, (off, n) in enumerate(zip(corr.ref_offsets, corr.ref_tokens))
            if corr.ref_present[b, k] for u in range(n)]
    return rng.choice(rows) if rows else None


@given(dense_maps(), st.sampled_from(["scal", "scal_pooled", "mdl", "mdl_all", "jsd"]))
def test_valid_dense_maps_of_every_dtype_are_accepted(inputs, loss):
    corr, dense = inputs
    value = {
        "scal": lambda: scal(dense, corr, eps=1e-9),
        "scal_pooled": lambda: scal(dense, corr, reduction="pooled", eps=1e-9),
        "mdl": lambda: mdl(dense, corr),
        "mdl_all": lambda: mdl(dense, corr, aggregate="all"),
        "jsd": lambda: mdl(dense, corr, divergence="jsd"),
    }[loss]()
    assert torch.isfinite(value)


@given(dense_maps(dtypes=(torch.float64, torch.float32)), st.floats(0.0, 0.98) | st.floats(1.02, 8.0), st.randoms(use_true_random=False))
def test_a_row_not_summing_to_one_raises(inputs, factor, rnd):
    corr, dense = inputs
    picked = _present_row(corr, rnd)
    if picked is None:
        return
    b, row = picked
    dense = dense.clone()
    dense[b, row] *= factor
    for loss in (lambda: scal(dense, corr, eps=1e-9), lambda: mdl(dense, corr, aggregate="all")):
        with pytest.raises(ValueError, match=rf"`x`.*sum to 1 within 0.001.*row {row} of sample {b} sums to"):
            loss()


def test_rows_summing_to_two_no_longer_give_a_plausible_scal():
    corr = Correspondences.from_dicts([[{0: 1}, {0: 0}]], ref_tokens=[1, 1], tgt_tokens=2)
    A = torch.tensor([[[0.5, 0.5], [0.9, 0.1]]])
    assert scal(A, corr).item() == pytest.approx(-(math.log(0.5) + math.log(0.9)) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="sums to 2"):
        scal(2 * A, corr)


def test_rows_of_absent_references_are_not_checked():
    corr = Correspondences.from_dicts([[{0: 1}, {0: 0}], [{0: 0}]], ref_tokens=[1, 1], tgt_tokens=2)  # sample 1: ref 1 absent
    A = torch.tensor([[[0.5, 0.5], [0.9, 0.1]], [[0.3, 0.7], [0.0, 0.0]]], dtype=torch.float64)
    assert torch.isfinite(scal(A, corr)) and torch.isfinite(mdl(A, corr, aggregate="all"))
    A[1, 0] = 0.0  # a present reference's row of zeros
    with pytest.raises(ValueError, match="row 0 of sample 1 sums to 0"):
        mdl(A, corr, aggregate="all")


@given(dense_maps(), st.sampled_from([float("nan"), float("inf"), -float("inf"), -1e-3, -0.5]), st.randoms(use_true_random=False))
def test_non_finite_or_negative_dense_entries_raise_naming_x(inputs, bad, rnd):
    corr, dense = inputs
    dense = dense.clone()
    b, row, col = rnd.randrange(dense.shape[0]), rnd.randrange(dense.shape[1]), rnd.randrange(dense.shape[2])
    dense[b, row, col] = bad
    expected = "only finite values" if not math.isfinite(bad) else ">= 0, but got 1 negative"
    with finite_checks(False):  # a dense map is checked whether or not the hot-path switch is on
        for loss in (scal, mdl):
            with pytest.raises(ValueError, match=rf"`x`.*{expected}"):
                loss(dense, corr)


def test_eps_zero_with_an_exact_zero_at_a_pair():
    corr = Correspondences.from_dicts([[{0: 1}, {0: 0}]], ref_tokens=[1, 1], tgt_tokens=2)
    A = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]], dtype=torch.float64)  # reference 0's point reads A = 0
    with pytest.raises(ValueError, match=r"exactly 0 at 1 pairs, e.g. sample 0, reference 0, point 0 \(row 0, target token 1\)"):
        scal(A, corr)
    with pytest.raises(ValueError, match="pass eps > 0"):
        MosaicObjective(scal_eps=0.0)(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), A, corr)
    # eps > 0: -log(eps) for that point, exactly.
    assert scal(A, corr, reduction="pooled", eps=1e-9).item() == pytest.approx(-(math.log(1e-9) + math.log(1 + 1e-9)) / 2)
    # MDL with eps = 0: disjoint supports read the smallest normal number, finite (documented).
    B = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    tiny = torch.finfo(torch.float64).tiny
    assert mdl(B, corr, eps=0.0).item() == pytest.approx(math.log(tiny), rel=1e-12)  # -½(1·(0 - log tiny))·2


@pytest.mark.parametrize("name", ["model_pred", "noise", "latents"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_flow_matching_inputs_raise_while_checks_are_on(name, bad):
    tensors = {"model_pred": torch.zeros(2, 3), "noise": torch.ones(2, 3), "latents": torch.zeros(2, 3)}
    tensors[name][1, 2] = bad
    with pytest.raises(ValueError, match=rf"`{name}` to hold only finite values"):
        flow_matching_loss(**tensors)
    with pytest.raises(ValueError, match=rf"`{name}` to hold only finite values"):
        MosaicObjective(scal_weight=0.0, mdl_weight=0.0)(tensors["model_pred"], tensors["noise"], tensors["latents"], None, None)
    with finite_checks(False):  # the hot path does not sync when the switch is off
        assert not torch.isfinite(flow_matching_loss(**tensors))


@pytest.mark.parametrize(
    "args, message",
    [
        (([[0.0]], torch.zeros(1, 1), torch.zeros(1, 1)), "`model_pred` to be a torch.Tensor"),
        ((torch.zeros(1, 1), torch.zeros(1, 2), torch.zeros(1, 1)), "`noise` of shape"),
        ((torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1), torch.zeros(1, 1)), "`model_pred` to have a floating dtype"),
    ],
)
def test_flow_matching_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        flow_matching_loss(*args)


# -- correspondences ---------------------------------------------------------------------------

NOT_CORRESPONDENCES = st.one_of(
    st.none(), st.integers(), st.text(max_size=3), st.lists(st.dictionaries(st.integers(0, 3), st.integers(0, 3)), max_size=2),
    st.builds(lambda: torch.zeros(1, 1, 1)),
)


@given(NOT_CORRESPONDENCES, st.sampled_from(DISJOINT_POLICIES))
def test_disjointness_on_something_else_names_corr(value, policy):
    for call in (
        lambda: enforce_disjoint(value, policy), lambda: find_conflicts(value), lambda: is_disjoint(value),
        lambda: contested_tokens(value), lambda: subsample(value, 2), lambda: save_released_dicts(value, "unused.json"),
    ):
        with pytest.raises(ValueError, match="Expected `corr` to be a Correspondences, but got"):
            call()


@given(st.integers(0, 3), st.integers(0, 3), st.booleans(), st.sampled_from(DISJOINT_POLICIES))
def test_batches_without_references_or_points_under_every_policy(batch, refs, with_confidence, policy):
    samples = [[{} for _ in range(refs)] for _ in range(batch)]  # K = refs (possibly 0), P = 0
    confidences = [[{} for _ in range(refs)] for _ in range(batch)] if with_confidence else None
    corr = Correspondences.from_dicts(samples, [2] * refs, 4, confidences=confidences)
    if policy == "confidence" and not with_confidence:
        with pytest.raises(ValueError, match="`corr.confidence` for policy 'confidence'"):
            enforce_disjoint(corr, policy)
        return
    out = enforce_disjoint(corr, policy)
    assert out.to_dicts() == corr.to_dicts() and out.num_refs == refs and out.batch_size == batch
    assert contested_tokens(out) == [[] for _ in range(batch)] and bool(is_disjoint(out).all())


@pytest.mark.parametrize(
    "confidences, name",
    [
        ({0: 1.0}, "`confidences` to mirror `samples`"),
        (0.5, "`confidences` to mirror `samples`"),
        ("high", "`confidences` to mirror `samples`"),
        (torch.ones(1, 1), "`confidences` to mirror `samples`"),
        ([{0: {0: 1.0}}], r"`confidences\[0\]` to mirror `samples\[0\]`"),
        ([[0.5]], r"`confidences\[0\]` to mirror `samples\[0\]`"),
        ([[{0: "high"}]], r"`confidences\[0\]\[0\]\[0\]` to be a finite real confidence, but got 'high'"),
        ([[{0: None}]], r"`confidences\[0\]\[0\]\[0\]` to be a finite real confidence, but got None"),
        ([[{0: True}]], r"`confidences\[0\]\[0\]\[0\]` to be a finite real confidence, but got True"),
        ([[{0: 1j}]], r"`confidences\[0\]\[0\]\[0\]` to be a finite real confidence"),
        ([[{0: float("nan")}]], r"`confidences\[0\]\[0\]\[0\]` to be a finite real confidence, but got nan"),
        ([[{1: 0.5}]], r"`confidences\[0\]\[0\]` to hold reference token 0"),
    ],
)
def test_confidences_of_the_wrong_type_name_the_argument(confidences, name):
    with pytest.raises(ValueError, match=name):
        Correspondences.from_dicts([[{0: 1}]], [2], 4, confidences=confidences)


def test_pixel_pairs_of_the_wrong_type_name_the_argument():
    grid, xy = TokenGrid(64, 64), torch.tensor([[1.0, 1.0]])
    cases = [
        ([[(xy, xy, "high")]], r"`samples\[0\]\[0\] confidence` to be a tensor or a list of numbers, but got 'high'"),
        ([[(xy, xy, ["a"])]], r"`samples\[0\]\[0\] confidence` to be a tensor or a list of numbers"),
        ([[(xy, xy, [float("inf")])]], r"`samples\[0\]\[0\] confidence` to be finite"),
        ([[(xy, xy, [True])]], r"`samples\[0\]\[0\] confidence`"),
        ([[("ab", xy)]], r"`samples\[0\]\[0\] ref_xy` to be a tensor or a list of numbers"),
        ([[(xy, [[1j, 1j]])]], r"`samples\[0\]\[0\] tgt_xy` to hold real numbers"),
        ([[5]], r"`samples\[0\]\[0\]` = \(ref_xy, tgt_xy\[, confidence\]\), but got int"),
        ([5], r"`samples\[0\]` to be a list over references"),
    ]
    for samples, message in cases:
        with pytest.raises(ValueError, match=message):
            Correspondences.from_pixel_pairs(samples, grid, grid)


def test_constructor_and_released_dicts_holes(tmp_path):
    one = torch.zeros(1, 1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="`ref_tokens` to be a list of K token counts, but got 2"):
        Correspondences(one, one, one.bool(), torch.ones(1, 1, dtype=torch.bool), 2, 4)
    path = tmp_path / "dicts.json"
    for text, message in [
        ('[[{"a": 1}]]', "integer tokens in sample 0, reference 0"),
        ("[[[1, 2]]]", "sample 0, reference 0 to be a dict"),
        ('[[{"0": null}]]', "integer tokens in sample 0, reference 0"),
    ]:
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_released_dicts(path)
    path.write_bytes(b'[[{"0": 1}]]\xff')
    with pytest.raises(ValueError, match="UTF-8 JSON"):
        load_released_dicts(path)


@given(st.floats(0.0, 0.99))
def test_truncated_or_malformed_correspondence_files_are_named(fraction):
    import tempfile

    folder = Path(tempfile.mkdtemp())
    path = folder / "corr.pt"
    save_correspondences(Correspondences.from_dicts([[{0: 1}, {1: 2}]], [2, 2], 4), path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ValueError, match=r"corr.pt"):
        load_correspondences(path)
    torch.save({"format_version": torch.tensor(1), "ref_index": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"corr.pt lacks \['tgt_index'"):
        load_correspondences(path)
    payload = {name: torch.zeros(1, 1, 1, dtype=torch.long) for name in ("ref_index", "tgt_index")}
    payload.update(point_mask=torch.ones(1, 1, 1), ref_present=torch.ones(1, 1, dtype=torch.bool),
                   ref_tokens=torch.tensor([2]), tgt_tokens=torch.tensor(4), format_version=torch.tensor(1))
    torch.save(payload, path)
    with pytest.raises(ValueError, match=r"corr.pt: malformed correspondences: Expected `point_mask` to be bool"):
        load_correspondences(path)


# -- images --------------------------------------------------------------------------------------


def _pixel(image: torch.Tensor) -> list[float]:
    return [round(v * 255, 3) for v in image[:, 0, 0].tolist()]


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


@given(st.integers(0, 65535))
def test_sixteen_bit_grey_is_scaled_not_clipped(value):
    image = Image.new("I;16", (2, 1), value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    with Image.open(io.BytesIO(buffer.getvalue())) as reopened:
        assert reopened.mode.startswith("I")
        out = load_rgb(reopened)
    assert _pixel(out) == [float(round(value / 257))] * 3
    with Image.open(io.BytesIO(buffer.getvalue())) as reopened:
        assert bool(load_mask_of(reopened).all()) == (value > 0)  # any non-zero 16-bit value is inside


def load_mask_of(image: Image.Image) -> torch.Tensor:
    path = Path(__import__("tempfile").mkdtemp()) / "mask.png"
    image.save(path)
    return load_mask(path)


def test_thirty_two_bit_values_outside_sixteen_bits_and_float_images_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"16-bit grey image with values in \[0, 65535\].*\[70000, 70000\]"):
        to_rgb(Image.new("I", (1, 1), 70000), "big.tif")
    with pytest.raises(ValueError, match="float.tif: expected an RGB, grey.*PIL mode 'F'"):
        load_rgb(_save(Image.new("F", (2, 2), 0.5), tmp_path / "float.tif"))


@given(st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)), st.integers(0, 255),
       st.sampled_from(["RGBA", "LA", "PNG-P"]))
def test_alpha_is_composited_on_the_documented_background(colour, alpha, kind):
    if kind == "LA":
        colour = (colour[0],) * 3
        image = Image.new("LA", (1, 1), (colour[0], alpha))
    elif kind == "RGBA":
        image = Image.new("RGBA", (1, 1), colour + (alpha,))
    else:  # a palette PNG whose entry 0 is `colour` with tRNS alpha
        image = Image.new("P", (1, 1), 0)
        image.putpalette(list(colour) + [0, 0, 0])
        image.info["transparency"] = bytes([alpha, 255])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    with Image.open(io.BytesIO(buffer.getvalue())) as reopened:
        got = _pixel(load_rgb(reopened))
    expected = [c * alpha / 255 + b * (1 - alpha / 255) for c, b in zip(colour, ALPHA_BACKGROUND)]
    assert all(abs(g - e) <= 1.0 for g, e in zip(got, expected)), (got, expected)


def test_palette_without_transparency_cmyk_and_grey(tmp_path):
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([200, 10, 30, 0, 90, 250])
    palette.putpixel((1, 0), 1)
    out = load_rgb(_save(palette, tmp_path / "palette.png"))
    assert out[:, 0, 1].mul(255).round().tolist() == [0.0, 90.0, 250.0] and _pixel(out) == [200.0, 10.0, 30.0]
    for cmyk, rgb in [((0, 0, 0, 0), [255.0] * 3), ((255, 0, 0, 0), [0.0, 255.0, 255.0]), ((0, 0, 0, 255), [0.0] * 3)]:
        assert _pixel(load_rgb(_save(Image.new("CMYK", (1, 1), cmyk), tmp_path / "cmyk.tif"))) == rgb
    jpeg = _save(Image.new("CMYK", (8, 8), (0, 255, 0, 0)), tmp_path / "cmyk.jpg", quality=100)
    assert all(abs(g - e) <= 3 for g, e in zip(_pixel(load_rgb(jpeg)), [255.0, 0.0, 255.0]))
    assert _pixel(load_rgb(_save(Image.new("L", (1, 1), 77), tmp_path / "grey.png"))) == [77.0] * 3
    assert _pixel(load_rgb(_save(Image.new("1", (1, 1), 1), tmp_path / "bw.png"))) == [255.0] * 3


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares width×height but whose pixel data is a few bytes (cannot decode)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("width, height", [(8193, 8192), (10_000, 10_000), (100_000, 100_000), (1, MAX_IMAGE_PIXELS + 1)])
def test_decompression_bombs_are_refused_from_the_header(tmp_path, width, height):
    path = _png_declaring(tmp_path / "bomb.png", width, height)
    # The pixel data is 16 bytes: decoding would fail with "truncated"; the refusal comes first.
    with pytest.raises(ValueError, match=rf"bomb.png: expected .*at most MAX_IMAGE_PIXELS = {MAX_IMAGE_PIXELS} pixels"):
        load_rgb(path)
    with pytest.raises(ValueError, match="MAX_IMAGE_PIXELS"):
        load_mask(path)


def test_an_image_at_the_limit_passes_the_size_check_and_a_truncated_one_is_named(tmp_path):
    path = _png_declaring(tmp_path / "edge.png", 8192, 8192)  # exactly MAX_IMAGE_PIXELS: decoding is attempted
    with pytest.raises(ValueError, match="edge.png: expected a readable image file, but OSError"):  # truncated data
        load_rgb(path)


# -- manifests and shards ------------------------------------------------------------------------


def test_manifest_with_odd_images_counts_bad_samples_and_converts_the_rest(tmp_path):
    manifest = make_manifest_fixture(tmp_path, ["dog"], size=64)
    base = manifest.parent
    _png_declaring(base / "images" / "bomb.png", 20_000, 20_000)
    _save(Image.new("F", (64, 64), 0.5), base / "images" / "float.tif")
    sixteen = Image.new("I;16", (64, 64), 32896)  # 128 in 8 bits
    _save(sixteen, base / "images" / "grey16.png")
    _save(Image.new("RGBA", (32, 32), (255, 0, 0, 0)), base / "images" / "clear.png")
    template = json.loads(manifest.read_text().splitlines()[0])
    rows = [
        dict(template, id="good"),
        dict(template, id="bomb", target="images/bomb.png"),
        dict(template, id="float", references=["images/float.tif"]),
        dict(template, id="grey16", target="images/grey16.png"),
        dict(template, id="clear", references=["images/clear.png"]),
    ]
    path = base / "odd.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = ManifestDataset(path)
    assert _pixel(data[3].target) == [128.0] * 3  # 16-bit: scaled, not clipped to white
    assert _pixel(data[4].references[0]) == [255.0] * 3  # fully transparent: the background
    for index, kind in [(1, "unreadable_image"), (2, "unreadable_image")]:
        with pytest.raises(BadSample) as bad:
            data[index]
        assert bad.value.kind == kind and rows[index]["id"] == bad.value.sample_id
    loader = SkippingLoader(data, batch_size=1, sampler=ResumableSampler(len(data), seed=0), max_epochs=1)
    seen = [batch[0].sample_id for batch in loader]
    assert sorted(seen) == ["clear", "good", "grey16"]
    assert loader.tally.counts == {"unreadable_image": 2}
    assert sorted(loader.tally.ids["unreadable_image"]) == ["bomb", "float"]


def test_non_utf8_manifest_names_file_line_and_column(tmp_path):
    good = json.dumps({"id": "a", "target": "t.png", "references": ["r.png"]}).encode()
    path = tmp_path / "latin.jsonl"
    path.write_bytes(good + b"\n\n" + b'{"id": "b", "caption": "caf\xe9", "target": "t.png", "references": ["r.png"]}\n')
    with pytest.raises(ValueError, match=r"latin.jsonl:3: expected UTF-8 text, but byte 0xe9 at column 28 is not valid UTF-8"):
        read_manifest(path)
    path.write_bytes(good + b"\r\n" + json.dumps({"id": "b", "caption": "café", "target": "t.png", "references": ["r.png"]}).encode())
    assert [e.caption for e in read_manifest(path)] == ["", "café"]  # UTF-8 and CRLF are fine
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n")
    assert [e.id for e in read_manifest(path)] == ["a"]  # a byte-order mark is fine


@pytest.fixture
def shards(tmp_path):
    pytest.importorskip("pyarrow")
    from mosaic_kit.data import make_released_fixture

    make_released_fixture(tmp_path, [("dog", "a dog"), ("cat", "a cat"), ("owl", "an owl")], rows_per_shard=2)
    return tmp_path


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.97])
def test_truncated_parquet_shard_is_refused_naming_it(shards, keep):
    from mosaic_kit.data import ReleasedDataset, count_released_rows, iter_released_rows

    shard = shards / "train-00001.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * keep)])
    for call in (lambda: ReleasedDataset(shards), lambda: count_released_rows(shards), lambda: list(iter_released_rows(shards))):
        with pytest.raises(ValueError, match=r"train-00001.parquet.*expected a readable parquet shard, but it cannot be read"):
            call()


def test_corrupt_row_group_is_a_counted_bad_sample(shards):
    from mosaic_kit.data import ReleasedDataset

    data = ReleasedDataset(shards, target_size=64, ref_size=64)
    shard = shards / "train-00000.parquet"
    raw = bytearray(shard.read_bytes())
    raw[4:400] = b"\xff" * 396  # the first column chunk's page headers and data; the footer stays intact
    shard.write_bytes(bytes(raw))
    data = ReleasedDataset(shards, target_size=64, ref_size=64)  # the footer still reads
    for index in (0, 1):
        with pytest.raises(BadSample) as bad:
            data[index]
        assert bad.value.kind == "malformed_row" and "train-00000.parquet row group 0" in str(bad.value)
    assert data[2].meta["subjects"] == ["owl"]
    loader = SkippingLoader(data, batch_size=1, sampler=ResumableSampler(len(data), seed=0), max_epochs=1)
    assert [batch[0].meta["subjects"] for batch in loader] == [["owl"]]
    assert loader.tally.total == 2
