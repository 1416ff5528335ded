import numpy as np
import pytest
from PIL import Image

from closedloop.images import (
    IMAGE_SIZE,
    dequantize,
    from_tensor,
    make_embedded_image_set,
    preprocess_image,
    quantize,
    read_image,
    read_image_folder,
    read_image_source,
    to_tensor,
)


def test_preprocess_is_an_exact_centre_crop_at_256(rng):
    image = rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8)
    out = preprocess_image(image)
    assert out.shape == (224, 224, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, image[16:240, 16:240] / 255.0, atol=1e-6)


def test_preprocess_resizes_the_short_side_and_keeps_the_centre():
    tall = np.zeros((600, 300, 3), dtype=np.uint8)
    tall[290:310, 140:160] = 255  # a bright square in the centre
    out = preprocess_image(tall)
    assert out.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    bright = np.argwhere(out[:, :, 0] > 0.5)
    centre = bright.mean(axis=0)
    np.testing.assert_allclose(centre, [111.5, 111.5], atol=1.0)
    # 20 px at 300 → 256 short side is ~17 px wide
    assert 15 <= np.ptp(bright[:, 1]) + 1 <= 19


def test_preprocess_antialiases_when_downsampling():
    stripes = np.zeros((1024, 1024), dtype=np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes average to mid grey after a 4x reduction
    out = preprocess_image(stripes)
    assert abs(out.mean() - 0.5) < 0.01 and out.std() < 0.05


def test_preprocess_accepts_grey_rgba_and_float():
    grey = np.full((300, 300), 128, dtype=np.uint8)
    rgba = np.full((300, 300, 4), 128, dtype=np.uint8)
    for image in (grey, rgba, grey.astype(np.float32) / 255):
        np.testing.assert_allclose(preprocess_image(image), 128 / 255, atol=1e-5)


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((10, 10, 2), np.uint8), r"shape \(H, W\), \(H, W, 3\) or \(H, W, 4\), but got \(10, 10, 2\)"),
        (np.full((10, 10, 3), 2.0, np.float32), r"finite values in \[0, 1\]"),
        (np.full((10, 10, 3), np.nan, np.float32), r"finite values in \[0, 1\]"),
    ],
)
def test_preprocess_refuses_bad_images(image, message):
    with pytest.raises(ValueError, match=message):
        preprocess_image(image)


def test_8_bit_round_trip(rng):
    q = rng.integers(0, 256, size=(3, 224, 224, 3), dtype=np.uint8)
    assert np.array_equal(quantize(dequantize(q)), q)
    x = rng.uniform(size=(2, 5, 5, 3)).astype(np.float32)
    assert np.abs(dequantize(quantize(x)) - x).max() <= 0.5 / 255 + 1e-7
    with pytest.raises(TypeError, match="expects uint8 images, but got dtype float32"):
        dequantize(x)
    with pytest.raises(ValueError, match="NaN"):
        quantize(np.array([np.nan]))


def test_tensor_layout_round_trip(rng):
    q = rng.integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8)
    tensor = to_tensor(q)
    assert tuple(tensor.shape) == (2, 3, 224, 224) and float(tensor.max()) <= 1.0
    assert np.array_equal(quantize(from_tensor(tensor)), q)


def test_embedded_set_is_deterministic_and_diverse():
    images = make_embedded_image_set(per_photo=6, seed=3)
    assert len(images) == 14 * 6 and len(set(images.ids)) == len(images)
    assert len(images.category_names) == 14 and "chelsea" in images.category_names
    assert np.bincount(images.categories).tolist() == [6] * 14
    pixels = images.read(np.arange(len(images)))
    assert pixels.shape == (84, 224, 224, 3) and pixels.dtype == np.uint8
    flat = pixels.reshape(len(pixels), -1)
    assert len(np.unique(flat, axis=0)) == len(images)  # all distinct
    again = make_embedded_image_set(per_photo=6, seed=3)
    assert np.array_equal(again.read([5, 40]), pixels[[5, 40]]) and again.digest() == images.digest()
    other = make_embedded_image_set(per_photo=6, seed=4)
    assert other.ids == images.ids and other.digest() != images.digest()
    assert not np.array_equal(other.read([5]), pixels[[5]])


def test_embedded_pool_has_several_hundred_images():
    assert len(read_image_source("embedded", per_photo=40)) == 560


def test_image_folder_layout(tmp_path, rng):
    for category, mode in [("n01440764", "RGB"), ("n01443537", "L"), ("n01484850", "P")]:
        (tmp_path / category).mkdir()
        for index in range(2):
            array = rng.integers(0, 256, size=(120 + index, 90, 3), dtype=np.uint8)
            Image.fromarray(array).convert(mode).save(tmp_path / category / f"img{index}.png")
    (tmp_path / "n01440764" / "notes.txt").write_text("not an image")
    images = read_image_folder(tmp_path)
    assert images.category_names == ("n01440764", "n01443537", "n01484850")
    assert images.categories.tolist() == [0, 0, 1, 1, 2, 2]
    assert images.ids[2] == "n01443537/img0.png"
    assert images.read([0, 5]).shape == (2, 224, 224, 3)
    with pytest.raises(ValueError, match=r"'indices' must lie in \[0, 5\], but got \[6\]"):
        images.read([6])


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="holds no images in ImageFolder layout"):
        read_image_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_image_folder(tmp_path / "missing")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        read_image(tmp_path / "broken.png")
    with pytest.raises(ValueError, match="allowed values are 'embedded'"):
        read_image_source("embeded")


def test_select_categories_keeps_and_renumbers_the_named_categories():
    from closedloop.images import make_embedded_image_set, select_categories

    pool = make_embedded_image_set(per_photo=2, seed=0)
    chosen = select_categories(pool, ["coffee", "astronaut"])
    assert chosen.category_names == ("coffee", "astronaut")
    assert chosen.ids == ("astronaut/000", "astronaut/001", "coffee/000", "coffee/001")
    assert chosen.categories.tolist() == [1, 1, 0, 0]
    np.testing.assert_array_equal(chosen.read([2]), pool.read([pool.ids.index("coffee/000")]))
    with pytest.raises(ValueError, match=r"'names' must be distinct categories of the image set \(astronaut, camera"):
        select_categories(pool, ["tea"])
