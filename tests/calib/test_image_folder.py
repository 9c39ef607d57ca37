"""data.dataset: image_folder (calib/image_folder.py): layouts, decoding as Pillow decodes,
resize/crop as torchvision does, statistics, the decode cache, and the deployment manifest.
The folders are a few dozen PNGs written by the tests."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from calib.datasets import DataError
from calib.image_folder import image_folder, pixel_stats
from compress.config import DataConfig
from compress.config_load import load_config
from compress.evaluate import preprocess

CLASSES = ["cat", "dog", "emu"]  # written in another order below: names decide, sorted


def pixels(k: int, i: int, shape=(8, 8, 3)) -> np.ndarray:
    rng = np.random.default_rng(100 * k + i)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def write_tree(root, per_class=(6, 5, 4), shape=(8, 8, 3)):
    """root/<class>/<i>.png; returns {relative path: pixels}."""
    written = {}
    for k, name in reversed(list(enumerate(CLASSES))):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class[k]):
            a = pixels(k, i, shape)
            Image.fromarray(a.squeeze()).save(root / name / f"{i}.png")
            written[f"{name}/{i}.png"] = a
    return written


def cfg(**kw):
    d = DataConfig(dataset="image_folder", root="x", **kw)
    return d.transform, d.split


def load(root, cache=None, log=None, **kw):
    t, s = cfg(**kw)
    return image_folder(root, t, s, cache, (log.append if log is not None else lambda m: None))


def test_train_and_val_folders_give_sorted_classes_and_exact_pixels(tmp_path):
    train = write_tree(tmp_path / "train")
    val = write_tree(tmp_path / "val", per_class=(2, 2, 2))
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")  # skipped
    (tmp_path / "train" / "dog" / ".hidden.png").write_bytes(b"junk")  # skipped
    d = load(tmp_path)
    assert d.classes == CLASSES and d.num_classes == 3
    assert len(d.train) == 15 and len(d.test) == 6 and d.input_shape == (3, 8, 8)
    assert d.train.images.dtype == torch.uint8 and d.train.labels.tolist() == [0] * 6 + [1] * 5 + [2] * 4
    # PNG is lossless: the decoded pixels are the written ones, channels first
    assert np.array_equal(d.train.images[6].numpy(), train["dog/0.png"].transpose(2, 0, 1))
    assert np.array_equal(d.test.images[-1].numpy(), val["emu/1.png"].transpose(2, 0, 1))
    assert d.preprocessing()["color"] == "RGB" and "resize" not in d.preprocessing()


def test_one_tree_is_split_per_class_with_its_own_seed(tmp_path):
    write_tree(tmp_path, per_class=(10, 5, 2))
    a, b = load(tmp_path), load(tmp_path)
    assert torch.equal(a.test.images, b.test.images)
    # 20% of 10, 5 and 2 images: 2, 1 and 1 (a class of two keeps one on each side)
    assert torch.bincount(a.test.labels).tolist() == [2, 1, 1] and len(a.train) == 13
    other = load(tmp_path, split={"test_fraction": 0.2, "seed": 1})
    assert not torch.equal(a.test.images, other.test.images)
    assert torch.bincount(load(tmp_path, split={"test_fraction": 0.5}).test.labels).tolist() == [5, 2, 1]


def test_resize_and_center_crop_follow_torchvision_on_pil_images(tmp_path):
    for k, name in enumerate(CLASSES):
        (tmp_path / name).mkdir()
        for i, (h, w) in enumerate([(12, 16), (20, 10), (9, 9)]):
            Image.fromarray(pixels(k, i, (h, w, 3))).save(tmp_path / name / f"{i}.png")
    with pytest.raises(DataError, match=r"images of different sizes need data.transform.resize"):
        load(tmp_path)
    d = load(tmp_path, transform={"resize": 8, "center_crop": [6, 7]}, split={"test_fraction": 0.34})
    assert d.input_shape == (3, 6, 7)
    # the recipe torchvision's Resize(8) + CenterCrop((6, 7)) runs on a PIL image
    im = Image.open(tmp_path / "cat" / "0.png").resize((10, 8), Image.Resampling.BILINEAR)  # 12x16 -> 8x10
    top, left = int(round((8 - 6) / 2)), int(round((10 - 7) / 2))
    want = np.asarray(im.crop((left, top, left + 7, top + 6))).transpose(2, 0, 1)
    got = torch.cat([d.train.images, d.test.images])
    assert any(np.array_equal(g.numpy(), want) for g in got)
    pre = d.preprocessing()
    assert pre["resize"] == 8 and pre["center_crop"] == [6, 7] and pre["interpolation"].startswith("bilinear")
    with pytest.raises(DataError, match=r"0.png: 10x8 after resize, smaller than data.transform.center_crop 9x9"):
        load(tmp_path, transform={"resize": 8, "center_crop": 9})


def test_channels_follow_the_images_or_the_config(tmp_path):
    for k, name in enumerate(CLASSES):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(pixels(k, i, (8, 8))).save(tmp_path / name / f"{i}.png")  # mode L
    gray = load(tmp_path, split={"test_fraction": 0.34})
    assert gray.input_shape == (1, 8, 8) and gray.preprocessing()["color"] == "L"
    rgb = load(tmp_path, split={"test_fraction": 0.34}, transform={"channels": 3})
    assert rgb.input_shape == (3, 8, 8) and torch.equal(rgb.train.images[:, 0], gray.train.images[:, 0])
    Image.fromarray(pixels(9, 9, (8, 8, 3))).save(tmp_path / "cat" / "rgb.png")  # one colour image: all RGB
    assert load(tmp_path, split={"test_fraction": 0.34}).input_shape == (3, 8, 8)


def test_statistics_from_the_training_images_or_as_given(tmp_path):
    write_tree(tmp_path / "train")
    write_tree(tmp_path / "test", per_class=(1, 1, 1))
    logs = []
    d = load(tmp_path, log=logs)
    x = d.train.images.double() / 255
    assert np.allclose(d.mean, x.mean((0, 2, 3)).numpy(), atol=1e-6)
    assert np.allclose(d.std, x.permute(1, 0, 2, 3).reshape(3, -1).std(1, unbiased=False).numpy(), atol=1e-6)
    assert any("normalization computed from the 15 training images" in m for m in logs)
    given = load(tmp_path, transform={"mean": [0.5], "std": [0.25]})
    assert given.mean == [0.5] and given.std == [0.25]
    # one value for three channels: written per channel, so evaluate.preprocess reads it as it is
    pre = given.preprocessing()
    assert pre["mean"] == [0.5] * 3 and pre["std"] == [0.25] * 3
    x = preprocess(given.test.images.numpy(), {"input": pre})
    assert np.allclose(x, given.normalize(given.test.images).numpy(), atol=1e-6)
    assert pixel_stats(torch.full((2, 1, 2, 2), 255, dtype=torch.uint8))[0] == [1.0]


def test_the_decode_cache_is_reused_and_follows_the_files(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    write_tree(root)
    logs = []
    first = load(root, cache, logs)
    assert any(m.startswith("data: decoding 15 images") for m in logs)
    (f,) = cache.iterdir()  # one file, no temp file left behind
    assert f.name.startswith("image-folder-") and f.suffix == ".safetensors"
    logs.clear()
    again = load(root, cache, logs)
    assert any("from the decode cache" in m for m in logs) and torch.equal(first.train.images, again.train.images)
    # another transform is another entry; a rewritten file (new size/mtime) decodes again
    load(root, cache, transform={"channels": 1})
    assert len(list(cache.iterdir())) == 2
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "cat" / "0.png")
    st = (root / "cat" / "0.png").stat()
    os.utime(root / "cat" / "0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    logs.clear()
    changed = load(root, cache, logs)
    assert any(m.startswith("data: decoding") for m in logs)
    assert not torch.equal(changed.train.images, first.train.images)


def test_a_corrupt_image_is_one_error_naming_the_file(tmp_path):
    write_tree(tmp_path)
    bad = tmp_path / "dog" / "3.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    with pytest.raises(DataError) as e:
        load(tmp_path)
    assert str(e.value).startswith(f"{bad}: cannot decode image (")
    assert len(str(e.value).splitlines()) == 1


def test_layout_errors_name_the_folder(tmp_path):
    with pytest.raises(DataError, match=r"not a folder"):
        load(tmp_path / "nowhere")
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"has train/ but neither val/ nor test/"):
        load(tmp_path)


def test_the_manifest_states_the_preprocessing_and_evaluate_reads_it(tmp_path):
    write_tree(tmp_path / "imgs" / "train")
    write_tree(tmp_path / "imgs" / "val", per_class=(2, 2, 2))
    (tmp_path / "c.yaml").write_text(
        "name: f\ndata: {dataset: image_folder, root: imgs, transform: {resize: [6, 6]}, calib_samples: 8}\n"
        "teacher: {model: resnet_tiny_teacher, train: {epochs: 1}}\nstudent: {model: resnet_tiny}\n"
        f"output: {{dir: {tmp_path / 'runs'}}}\n")
    from compress.export import export_model
    from compress.models import build_model
    from compress.pipeline import load_data
    config = load_config(tmp_path / "c.yaml")
    data = load_data(config)
    assert any((tmp_path / "runs" / ".cache").iterdir())  # the default cache: <output.dir>/.cache
    m = export_model(build_model("resnet_tiny", 3, 3).eval(), tmp_path, data, 17, False, "s")
    inp = m["input"]
    assert inp["resize"] == [6, 6] and inp["color"] == "RGB" and inp["shape"] == ["batch", 3, 6, 6]
    assert m["output"]["classes"] == CLASSES
    assert json.loads((tmp_path / "manifest.json").read_text())["input"]["mean"] == data.mean
    x = preprocess(data.test.images.numpy(), m)
    assert np.allclose(x, data.normalize(data.test.images).numpy(), atol=1e-6)


def test_transform_is_checked_in_the_config():
    with pytest.raises(ValueError, match="mean and std: give both"):
        DataConfig(dataset="image_folder", root="x", transform={"mean": [0.5]})
    with pytest.raises(ValueError, match=r"expected a positive int or \[height, width\]"):
        DataConfig(dataset="image_folder", root="x", transform={"resize": [0, 4]})


def test_the_example_script_writes_fashion_mnist_folders_in_label_order(tmp_path):
    import importlib.util

    from calib.datasets import fashion_mnist
    from tests.calib.test_datasets import make_fmnist_folder
    from tests.conftest import ROOT
    spec = importlib.util.spec_from_file_location("make_image_folder", ROOT / "examples" / "make_image_folder.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    (tmp_path / "idx").mkdir()
    idx = make_fmnist_folder(tmp_path / "idx")  # 40 train / 20 test, labels i % 10
    script.main([str(tmp_path / "out"), "--root", str(idx), "--per-class-train", "3"])
    d = load(tmp_path / "out")
    assert d.classes[:2] == ["0-T-shirt_top", "1-Trouser"] and d.input_shape == (3, 32, 32)
    assert len(d.train) == 30 and len(d.test) == 20
    ref = fashion_mnist(idx)
    assert d.test.labels.tolist() == sorted(ref.test.labels.tolist())  # class k's folder holds label k
    # gray repeated over RGB, resized 28 -> 32 by Pillow's bilinear
    want = np.asarray(Image.fromarray(ref.test.images[0, 0].numpy()).resize((32, 32), Image.Resampling.BILINEAR))
    assert np.array_equal(d.test.images[0, 1].numpy(), want)
