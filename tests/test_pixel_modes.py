"""Every pixel mode decoded by one rule (``refinery_pipeline/sources/pixels.py``), on every path.

Each file below is written from known raw values, and its expected ``(H, W, 3)`` uint8 pixels
are computed here with numpy from those raw values (not by PIL's conversions), then compared
with what each pixel path gives: the tree path (:func:`read_image_file`, exact), the ``.beton``
conversion (raw pixels: exact; JPEG q90: a tolerance) and a mapped data set's PIL images.
"""
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from refinery_pipeline.sources.dataset import BetonOptions
from refinery_pipeline.sources.data_cache import open_dataset
from refinery_pipeline.core.errors import DataSetError
from refinery_pipeline.sources.pixels import read_image_file
from refinery_pipeline.loaders.pixel_readers import BetonImages, MappedImages

H, W = 24, 32
PALETTE = np.array([[10, 20, 30], [200, 40, 60], [70, 180, 90], [250, 250, 5]], np.uint8)


def ramp(maximum, channels=1, dtype=np.uint8, offset=0) -> np.ndarray:
    """A smooth ``(H, W, channels)`` ramp from 0 to about ``maximum`` (JPEG keeps it close)."""
    y, x = np.mgrid[0:H, 0:W]
    planes = [((x / (W - 1) * 0.6 + y / (H - 1) * 0.4 + 0.3 * c + offset) % 1.0) * maximum
              for c in range(channels)]
    return np.stack(planes, -1).round().astype(dtype)


def grey(values) -> np.ndarray:
    return np.repeat(values.reshape(H, W, 1), 3, axis=2)


def palette_indices() -> np.ndarray:
    return (np.arange(W)[None, :] // 8 + np.arange(H)[:, None] // 12) % 4


def high_byte(values) -> np.ndarray:
    return (values.astype(np.int64) >> 8).astype(np.uint8)


def cmyk_to_rgb(cmyk) -> np.ndarray:
    """PIL's documented CMYK rule, in integers: (255 - K) - round(C * (255 - K) / 255)."""
    c, k = cmyk[..., :3].astype(np.int64), cmyk[..., 3:].astype(np.int64)
    return ((255 - k) - (2 * c * (255 - k) + 255) // 510).astype(np.uint8)


def ycbcr_to_rgb(ycc) -> np.ndarray:
    """JFIF's YCbCr -> RGB in floating point, rounded."""
    y, cb, cr = (ycc[..., i].astype(np.float64) for i in range(3))
    rgb = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                    y + 1.772 * (cb - 128)], -1)
    return np.clip(np.floor(rgb + 0.5), 0, 255).astype(np.uint8)


def _bits(path):
    image = Image.fromarray(np.kron(np.array([[0, 1, 1, 0], [1, 0, 0, 1]], bool),
                                    np.ones((12, 8), bool)))
    image.save(path)
    return np.asarray(image).astype(np.uint8)[..., None].repeat(3, 2) * 255


def _l(path):
    values = ramp(255)[..., 0]
    Image.fromarray(values, "L").save(path)
    return grey(values)


def _la(path):
    values, alpha = ramp(255)[..., 0], ramp(255, offset=0.5)[..., 0]
    Image.fromarray(np.stack([values, alpha], -1), "LA").save(path)
    return grey(values)


def _palette(path, transparency=None, alpha=None):
    indices = palette_indices().astype(np.uint8)
    if alpha is None:
        image = Image.fromarray(indices, "P")
    else:
        image = Image.frombytes("PA", (W, H), np.stack([indices, alpha], -1).tobytes())
    image.putpalette(PALETTE.reshape(-1).tolist())
    if transparency is not None:
        image.info["transparency"] = transparency
    image.save(path, **({} if transparency is None else {"transparency": transparency}))
    return PALETTE[indices]


def _rgb(path, channels=3):
    values = ramp(255, channels)
    Image.fromarray(values, "RGBA" if channels == 4 else "RGB").save(path)
    return values[..., :3]


def _cmyk(path, **save):
    values = ramp(255, 4)
    Image.frombytes("CMYK", (W, H), values.tobytes()).save(path, **save)
    with Image.open(path) as image:  # a JPEG's own (lossy) CMYK samples, read raw
        return cmyk_to_rgb(np.asarray(image))


def _ycbcr(path):
    values = np.concatenate([ramp(255, 1), ramp(100, 2) + 78], -1)
    Image.frombytes("YCbCr", (W, H), values.tobytes()).save(path)
    return ycbcr_to_rgb(values)


def _sixteen(path, mode):
    values = ramp(65535, dtype=np.uint16)[..., 0]
    dtype = ">u2" if mode == "I;16B" else "<u2"
    Image.frombytes(mode, (W, H), values.astype(dtype).tobytes()).save(path)
    return grey(high_byte(values))


def _int32(path):
    values = ramp(90000, dtype=np.int64)[..., 0].astype(np.int32) - 10000
    Image.fromarray(values, "I").save(path)
    return grey(high_byte(np.clip(values, 0, 65535)))


def _float(path):
    values = ramp(1.4, dtype=np.float32)[..., 0] - 0.2
    values[0, 0] = np.nan
    Image.fromarray(values, "F").save(path)
    return grey(np.floor(np.clip(np.nan_to_num(values), 0, 1) * 255 + 0.5).astype(np.uint8))


def _wide_colour(path, channels):
    import cv2
    values = ramp(65535, channels, np.uint16)
    cv2.imwrite(str(path), values[..., [2, 1, 0, 3][:channels]])  # OpenCV writes BGR(A)
    return high_byte(values[..., :3])


def _frames(path):
    """Two frames (pages): the first is read."""
    indices = palette_indices()
    first, second = PALETTE[indices], PALETTE[(indices + 1) % 4]
    Image.fromarray(first).save(path, save_all=True, append_images=[Image.fromarray(second)])
    return first


# name -> (file writer returning the expected pixels, 8-bit: torchvision's loader agrees)
FILES = {
    "mode_1.png": (_bits, True),
    "mode_L.png": (_l, True),
    "mode_LA.png": (_la, True),
    "mode_P.png": (_palette, True),
    "mode_P_transparency.png": (lambda p: _palette(p, transparency=1), True),
    "mode_PA.tif": (lambda p: _palette(p, alpha=ramp(255)[..., 0]), True),
    "mode_RGB.png": (_rgb, True),
    "mode_RGBA.png": (lambda p: _rgb(p, 4), True),
    "mode_CMYK.tif": (_cmyk, True),
    "mode_CMYK_jpeg.jpg": (lambda p: _cmyk(p, quality=95), True),  # not beside .tif: one key
    "mode_YCbCr.tif": (_ycbcr, True),
    "mode_I16.png": (lambda p: _sixteen(p, "I;16"), False),
    "mode_I16B.tif": (lambda p: _sixteen(p, "I;16B"), False),
    "mode_I16L.tif": (lambda p: _sixteen(p, "I;16L"), False),
    "mode_I.tif": (_int32, False),
    "mode_F.tif": (_float, False),
    "rgb16.png": (lambda p: _wide_colour(p, 3), True),  # PIL itself keeps 16-bit colour's high byte
    "rgba16.png": (lambda p: _wide_colour(p, 4), True),
    "frames.png": (_frames, True),  # an animated PNG
    "pages.tif": (_frames, True),
}
# PIL converts YCbCr in 6-bit fixed point: up to one level from the exact formula (and up to
# a few once those one-level differences go through a JPEG encoder)
TOLERANCE = {"mode_YCbCr.tif": 1}
JPEG_TOLERANCE = {"mode_YCbCr.tif": 8}


@pytest.fixture(scope="module")
def mode_tree(tmp_path_factory):
    """``train/all/<file>`` for every case, and each file's expected pixels."""
    folder = tmp_path_factory.mktemp("modes") / "train" / "all"
    folder.mkdir(parents=True)
    expected = {name: write(folder / name) for name, (write, _) in FILES.items()}
    return folder.parent, expected


def assert_pixels(got, expected, name, tolerance=None):
    tolerance = TOLERANCE.get(name, 0) if tolerance is None else tolerance
    assert got.shape == expected.shape and got.dtype == np.uint8, (name, got.shape, got.dtype)
    worst = np.abs(got.astype(np.int64) - expected).max()
    assert worst <= tolerance, f"{name}: off by up to {worst} levels"


@pytest.mark.parametrize("name", FILES)
def test_tree_path_decodes_every_mode_exactly(mode_tree, name):
    root, expected = mode_tree
    assert_pixels(read_image_file(root / "all" / name), expected[name], name)


@pytest.fixture(scope="module", params=["raw", "jpg"])
def beton_images(mode_tree, request, tmp_path_factory):
    """The tree converted as ``refine`` converts it, raw pixels or JPEG q90: file -> pixels."""
    root, _ = mode_tree
    dataset = open_dataset(root, "train", tmp_path_factory.mktemp("cache"),
                           BetonOptions(write_mode=request.param), num_workers=1)
    images = BetonImages(dataset.path)
    return request.param, {name.split("/")[-1]: images.image(n)
                           for n, name in enumerate(dataset.meta["files"])}


@pytest.mark.parametrize("name", FILES)
def test_beton_conversion_decodes_every_mode(mode_tree, beton_images, name):
    """Raw pixels exactly; JPEG q90 as the expected pixels re-encoded the way FFCV's writer
    encodes (OpenCV, quality 90) and decoded as its loader decodes."""
    write_mode, images = beton_images
    expected = mode_tree[1][name]
    if write_mode == "raw":
        assert_pixels(images[name], expected, name)
    else:
        assert_pixels(images[name], jpeg_round_trip(expected), name, JPEG_TOLERANCE.get(name, 0))


def jpeg_round_trip(pixels) -> np.ndarray:
    import cv2

    from refinery_pipeline.sources.pixels import decode_jpeg
    ok, encoded = cv2.imencode(".jpg", np.ascontiguousarray(pixels[..., ::-1]),
                               [int(cv2.IMWRITE_JPEG_QUALITY), 90])
    return decode_jpeg(encoded.tobytes())


@pytest.mark.parametrize("name", [n for n, (_, eight_bit) in FILES.items() if eight_bit])
def test_eight_bit_files_read_as_torchvision_imagefolder_reads_them(mode_tree, name):
    """Tree, .beton and a torchvision ImageFolder pixel source agree on 8-bit files (JPEGs
    apart: the tree path decodes them with libjpeg-turbo's fast DCT, as FFCV does)."""
    from torchvision.datasets.folder import pil_loader
    root, _ = mode_tree
    path = root / "all" / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's own notes on palette transparency
        reference = np.asarray(pil_loader(str(path)))
    assert np.array_equal(read_image_file(path), reference)


def mapped(*images):
    return MappedImages([(image, 0) for image in images])


@pytest.mark.parametrize("name", FILES)
def test_mapped_pil_images_decode_every_mode(mode_tree, name):
    root, expected = mode_tree
    with Image.open(root / "all" / name) as image:
        assert_pixels(mapped(image).image(0), expected[name], name)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_mapped_sixteen_bit_pil_images_in_memory(mode):
    values = ramp(65535, dtype=np.uint16)[..., 0]
    image = Image.frombytes(mode, (W, H), values.astype(">u2" if mode == "I;16B" else "<u2")
                            .tobytes())
    assert_pixels(mapped(image).image(0), grey(high_byte(values)), mode)


GREY = ramp(255)[..., 0]
COLOUR = ramp(255, 3)


@pytest.mark.parametrize("image, expected", [
    (COLOUR, COLOUR),
    (GREY, grey(GREY)),
    (GREY[..., None], grey(GREY)),
    (np.stack([GREY, 255 - GREY], -1), grey(GREY)),
    (np.concatenate([COLOUR, GREY[..., None]], -1), COLOUR),
    (COLOUR.astype(np.uint16) * 257, COLOUR),
    (GREY > 127, grey(np.where(GREY > 127, 255, 0).astype(np.uint8))),
    (COLOUR / 255.0, COLOUR),
    (torch.from_numpy(COLOUR).permute(2, 0, 1), COLOUR),
    (torch.from_numpy(COLOUR), COLOUR),
    (torch.from_numpy(GREY)[None].float() / 255, grey(GREY)),
    (torch.from_numpy(GREY), grey(GREY)),
    (torch.from_numpy(COLOUR).permute(2, 0, 1).to(torch.bfloat16) / 255, None),
], ids=["uint8 HWC", "grey HW", "grey HW1", "grey+alpha", "RGBA", "uint16", "bool",
        "float [0,1]", "tensor CHW", "tensor HWC", "tensor 1HW float", "tensor HW",
        "tensor bfloat16"])
def test_mapped_arrays_and_tensors(image, expected):
    got = mapped(image).image(0)
    if expected is None:  # bfloat16 rounds 8-bit levels: within one level
        assert_pixels(got, COLOUR, "bfloat16", tolerance=1)
    else:
        assert_pixels(got, expected, "array")


@pytest.mark.parametrize("image, fragment", [
    (COLOUR.astype(np.int64), "dtype int64"),
    (COLOUR.astype(np.int16), "dtype int16"),
    (np.zeros((H, W, 5), np.uint8), "shape (24, 32, 5)"),
    (np.zeros((2, H, W, 3), np.uint8), "shape (2, 24, 32, 3)"),
    (np.zeros(W, np.uint8), "shape (32,)"),
], ids=["int64", "int16", "5 channels", "batch", "1-D"])
def test_mapped_arrays_without_an_agreed_scale_are_refused_in_one_line(image, fragment):
    with pytest.raises(DataSetError) as raised:
        mapped(COLOUR, image).image(1)
    message = str(raised.value)
    assert "\n" not in message and "image 1 of the mapped data set" in message
    assert fragment in message and "give uint8" in message


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.uint16, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=9)))
def test_sixteen_bit_rule_is_the_high_byte(values):
    assert np.array_equal(mapped(values).image(0), grey_of(high_byte(values)))


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.uint8, st.tuples(st.integers(1, 9), st.integers(1, 9), st.just(3))),
       st.sampled_from([np.float16, np.float32, np.float64]))
def test_float_rule_round_trips_every_eight_bit_level(values, dtype):
    """v / 255 in [0, 1] comes back as v, in any float precision torchvision uses."""
    assert np.array_equal(mapped((values / 255).astype(dtype)).image(0), values)


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 9), st.integers(1, 9)),
                  elements=st.floats(-1e6, 1e6, width=32) | st.just(float("nan"))))
def test_float_rule_clips_out_of_range_values(values):
    expected = np.floor(np.clip(np.nan_to_num(values.astype(np.float64)), 0, 1) * 255 + 0.5)
    assert np.array_equal(mapped(values).image(0), grey_of(expected.astype(np.uint8)))


def grey_of(values) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=2)
