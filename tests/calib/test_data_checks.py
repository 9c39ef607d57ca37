"""Data checked, not trusted (issue 12): every case that once gave wrong numbers in silence now
fails before training with one line naming what is wrong. One test per case of the issue's
"Why", from a user's dataset factory written beside the config by the test (so the config's
folder on the import path, root and kwargs are exercised too)."""
import json
import textwrap

import pytest
import torch
import yaml

from calib.checks import check_class_order, check_classification, check_images, check_limits, data_digest
from calib.datasets import Dataset, Split
from compress.config import ConfigError
from compress.config_load import load_config
from compress.errors import UserError
from compress.pipeline import Pipeline, load_data
from compress.preflight import preflight

# A user's module (written beside the config): 3 classes of 8x8 RGB images, one bright channel
# per class; `order` names the classes (a permuted order permutes the labels, as a re-sorted
# folder would); `pixels` gives uint8, float in [0, 1] (declared or not), or float 0-255.
USER_MODULE = textwrap.dedent('''
    import torch
    from torch import nn

    from calib.datasets import Dataset, Split

    SEEN = []


    def net(num_classes, in_channels):
        return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(4, num_classes))


    def split(n, names, order, seed, shift):
        g = torch.Generator().manual_seed(seed)
        kind = torch.arange(n) % 3
        x = torch.randint(0, 60, (n, 3, 8, 8), generator=g)
        for k in range(3):
            x[kind == k, k] += 150 + shift
        labels = torch.tensor([order.index(names[k]) for k in kind.tolist()])
        return Split(x.clamp(0, 255).to(torch.uint8), labels)


    def blobs(root=None, order=("red", "green", "blue"), n=48, pixels="uint8", declare=False, shift=0,
              label_offset=0, test_classes=3):
        SEEN.append(root)
        names, order = ("red", "green", "blue"), list(order)
        train, test = split(n, names, order, 0, shift), split(n // 2, names, order, 1, shift)
        train.labels = train.labels + label_offset
        keep = test.labels < test_classes
        test = Split(test.images[keep], test.labels[keep])
        if pixels != "uint8":
            div = 255.0 if pixels == "unit" else 1.0
            train.images, test.images = train.images.float() / div, test.images.float() / div
        return Dataset("blobs", train, test, 3, [0.3] * 3, [0.3] * 3, order,
                       pixels="float" if declare else "uint8")


    def no_root():
        return blobs()
''')


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("user")
    (d / "data_checks_user.py").write_text(USER_MODULE)
    return d


def make_cfg(user_dir, tmp_path, data=None, teacher=None, name="dc"):
    raw = {"name": name, "data": {"dataset": "data_checks_user:blobs", "batch_size": 16, "eval_batch_size": 64,
                                  **(data or {})},
           "teacher": teacher or {"model": "data_checks_user:net",
                                  "train": {"epochs": 1, "lr": 0.05, "optimizer": "adamw", "augment": False}},
           "student": {"model": "data_checks_user:net"}, "stages": [],
           "output": {"dir": str(tmp_path / "runs")}}
    p = user_dir / f"{tmp_path.name}.yaml"  # beside the module: its folder goes on the import path
    p.write_text(yaml.safe_dump(raw))
    return load_config(p)


def load_error(cfg) -> str:
    with pytest.raises(UserError) as e:
        load_data(cfg)
    return str(e.value)


# -- the issue's cases, one test each -------------------------------------------------------

def test_a_folder_path_as_dataset_is_a_config_error_with_the_fix(tmp_path):
    (tmp_path / "c.yaml").write_text("name: x\ndata: {dataset: ./my_images}\nteacher: {model: resnet8, "
                                     "train: {epochs: 1}}\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "c.yaml")
    assert ("data.dataset: './my_images': expected fashion_mnist, synthetic, image_folder or 'pkg.module:factory' "
            "(a folder of images: dataset: image_folder, root: ./my_images)") in str(e.value)


def test_a_factory_gets_root_and_kwargs_and_imports_from_the_configs_folder(user_dir, tmp_path):
    cfg = make_cfg(user_dir, tmp_path, {"root": "pics", "kwargs": {"order": ["blue", "green", "red"], "n": 30}})
    data = load_data(cfg)
    import data_checks_user
    assert data_checks_user.SEEN[-1] == str(user_dir / "pics")  # relative to the config file
    assert data.classes == ["blue", "green", "red"] and len(data.train) == 30
    assert data.train.labels[:3].tolist() == [2, 1, 0]  # red, green, blue under the kwargs' order


def test_a_root_the_factory_cannot_take_and_unknown_kwargs_are_named(user_dir, tmp_path):
    msg = load_error(make_cfg(user_dir, tmp_path, {"dataset": "data_checks_user:no_root", "root": "pics"}))
    assert msg == (f"data.root={user_dir / 'pics'}: data.dataset='data_checks_user:no_root' takes no `root` "
                   f"(factory()): remove data.root, or give the factory a root parameter")
    msg = load_error(make_cfg(user_dir, tmp_path, {"kwargs": {"colour": 1}}))
    assert msg.startswith("data.dataset='data_checks_user:blobs': factory(root=None, order=") and \
        "does not take data.kwargs ['colour']" in msg


def test_a_missing_factory_module_names_the_configs_folder(user_dir, tmp_path):
    msg = load_error(make_cfg(user_dir, tmp_path, {"dataset": "my_loader:make"}))
    assert msg.startswith("data.dataset='my_loader:make': cannot import module 'my_loader' (No module named")
    assert f"the config's folder {user_dir} is on the import path, so my_loader.py beside the config imports" in msg


def test_float_images_in_0_1_undeclared_fail_instead_of_being_divided_again(user_dir, tmp_path):
    msg = load_error(make_cfg(user_dir, tmp_path, {"kwargs": {"pixels": "unit"}}))
    assert msg.splitlines()[0] == (
        "data.dataset='data_checks_user:blobs': train images are float32 in [0, 0.82], expected uint8 0-255; "
        "float images in [0, 1] must be declared: Dataset(..., pixels='float') (they are never rescaled by guess)")
    # declared: accepted, and scaled once (the same model input as the uint8 images give)
    ok = load_data(make_cfg(user_dir, tmp_path, {"kwargs": {"pixels": "unit", "declare": True}}))
    u8 = load_data(make_cfg(user_dir, tmp_path))
    assert torch.allclose(ok.normalize(ok.test.images), u8.normalize(u8.test.images), atol=1e-5)
    assert ok.preprocessing()["scale"] == 1.0 and u8.preprocessing()["scale"] == pytest.approx(1 / 255)
    # declared float but 0-255 values
    msg = load_error(make_cfg(user_dir, tmp_path, {"kwargs": {"pixels": "raw", "declare": True}}))
    assert "train images hold values in [0, 209], expected [0, 1] as declared by pixels='float'" in msg


def test_labels_out_of_range_fail_at_load_not_mid_training(user_dir, tmp_path):
    msg = load_error(make_cfg(user_dir, tmp_path, {"kwargs": {"label_offset": 1}}))
    assert msg == ("data.dataset='data_checks_user:blobs': train labels hold 3 (16 labels out of range), "
                   "expected 0..2 (num_classes=3)")


def test_a_class_missing_from_test_is_named(user_dir, tmp_path):
    msg = load_error(make_cfg(user_dir, tmp_path, {"kwargs": {"test_classes": 2}}))
    assert msg == ("data.dataset='data_checks_user:blobs': class blue missing from the test split (16 examples): "
                   "every class must be in train and test")


@pytest.mark.parametrize("data, line", [
    ({"limit_train": 49}, "data.limit_train=49: larger than the training split (48 examples)"),
    ({"limit_test": 25}, "data.limit_test=25: larger than the test split (24 examples)"),
    ({"calib_samples": 49}, "data.calib_samples=49: larger than the training split (48 examples)"),
    ({"limit_train": 30, "calib_samples": 31},
     "data.calib_samples=31: larger than the training split after limit_train (30 examples)"),
])
def test_limits_larger_than_the_data_are_errors(user_dir, tmp_path, data, line):
    assert load_error(make_cfg(user_dir, tmp_path, data)) == line
    assert len(load_data(make_cfg(user_dir, tmp_path)).train) == 48  # the default calib_samples (1024) is capped


def test_limits_of_builtin_sets_are_checked_by_validate_without_loading(tmp_path):
    from tests.calib.test_datasets import make_fmnist_folder
    make_fmnist_folder(tmp_path)
    cfg = load_config_text(tmp_path, f"data: {{dataset: fashion_mnist, root: {tmp_path}, limit_train: 41}}")
    with pytest.raises(UserError, match=r"^data.limit_train=41: larger than the training split \(40 examples\)$"):
        preflight(cfg)
    cfg = load_config_text(tmp_path, "data: {dataset: synthetic, synthetic: {test_size: 32}, limit_test: 33}")
    with pytest.raises(UserError, match=r"^data.limit_test=33: larger than the test split \(32 examples\)$"):
        preflight(cfg)


def load_config_text(tmp_path, data_line: str):
    (tmp_path / "v.yaml").write_text(f"name: v\n{data_line}\nteacher: {{model: resnet_tiny_teacher, "
                                     f"train: {{epochs: 1}}}}\nstudent: {{model: resnet_tiny}}\n")
    return load_config(tmp_path / "v.yaml")


def test_changed_data_reruns_the_stages(user_dir, tmp_path):
    logs = []
    Pipeline(make_cfg(user_dir, tmp_path), logs.append).run_stages()
    Pipeline(make_cfg(user_dir, tmp_path), logs.append).run_stages()
    assert "[teacher] up to date, skipped" in logs
    logs.clear()
    Pipeline(make_cfg(user_dir, tmp_path, {"kwargs": {"shift": 5}}), logs.append).run_stages()  # same config
    assert any(line.startswith("[teacher] rerunning: its settings, or an earlier stage's, differ") for line in logs)
    rec = json.loads((tmp_path / "runs" / "dc" / "data.json").read_text())
    assert rec["classes"] == ["red", "green", "blue"] and len(rec["digest"]) == 16


def test_a_teacher_with_another_class_order_fails_showing_both_lists(user_dir, tmp_path):
    # the teacher a run trains carries its class order in its weights' metadata ...
    Pipeline(make_cfg(user_dir, tmp_path, name="t"), lambda s: None).run_stages()
    ckpt = tmp_path / "runs" / "t" / "00-teacher" / "model.safetensors"
    teacher = {"model": "data_checks_user:net", "checkpoint": str(ckpt)}
    cfg = make_cfg(user_dir, tmp_path, {"kwargs": {"order": ["blue", "green", "red"]}}, teacher, name="s")
    with pytest.raises(UserError) as e:
        preflight(cfg)
    assert str(e.value) == (
        f"teacher.checkpoint={ckpt} was trained with classes ['red', 'green', 'blue']; the data has "
        f"['blue', 'green', 'red'] (in another order): its logits would be read against the wrong labels. "
        f"Use data with the teacher's classes and order, or retrain the teacher")
    preflight(make_cfg(user_dir, tmp_path, None, teacher, name="s"))  # the teacher's own order passes
    # ... and a checkpoint without that metadata is recorded in the run, checked on a later run
    from compress.checkpoint import read_state_dict
    torch.save(read_state_dict(ckpt), tmp_path / "plain.pt")
    teacher["checkpoint"] = str(tmp_path / "plain.pt")
    Pipeline(make_cfg(user_dir, tmp_path, None, teacher, name="p"), lambda s: None).run_stages()
    with pytest.raises(UserError, match=r"^teacher \(recorded in .*metrics.json\) was trained with classes "
                                        r"\['red', 'green', 'blue'\]; the data has \['blue', 'green', 'red'\]"):
        Pipeline(make_cfg(user_dir, tmp_path, {"kwargs": {"order": ["blue", "green", "red"]}}, teacher, name="p"),
                 lambda s: None).run_stages()


# -- the checks as functions (what a task's own checks sit beside) -------------------------

def small(images, labels, **kw):
    return Dataset("d", Split(images, labels), Split(images, labels), 2, [0.5], [0.5], ["a", "b"], **kw)


def test_check_functions_name_each_problem():
    x = torch.zeros(4, 1, 4, 4, dtype=torch.uint8)
    y = torch.tensor([0, 1, 0, 1])
    assert check_images(small(x, y), "d") == [] and check_classification(small(x, y), "d") == []
    assert check_images(small(x.int(), y), "d")[0] == ("d: train images are torch.int32, expected uint8 (0-255) or, "
                                                       "declared with pixels='float', float in [0, 1]")
    assert "uint8 but the Dataset declares pixels='float'" in check_images(small(x, y, pixels="float"), "d")[0]
    assert check_classification(small(x, y.int()), "d")[0] == ("d: train labels are torch.int32 (4,), expected "
                                                               "int64 (N,) class indices")
    odd = Dataset("d", Split(x, y), Split(torch.zeros(4, 1, 5, 5, dtype=torch.uint8), y), 2, [0.5], [0.5])
    assert check_images(odd, "d") == ["d: train images are (1, 4, 4) (C, H, W) but test images (1, 5, 5): "
                                      "both splits must have one shape"]
    assert check_limits({"train": 4, "test": 4}, {"limit_train": 4, "calib_samples": None}) == []
    assert check_class_order(["a", "b"], ["a", "c"], "t").startswith("t was trained with classes ['a', 'b']; "
                                                                   "the data has ['a', 'c'] (with other names)")
    assert check_class_order([], ["a"], "t") is None


def test_the_digest_follows_pixels_labels_and_classes():
    x = torch.zeros(4, 1, 4, 4, dtype=torch.uint8)
    y = torch.tensor([0, 1, 0, 1])
    d0 = data_digest(small(x, y))
    x2 = x.clone()
    x2[0, 0, 0, 0] = 1
    others = [small(x2, y), small(x, y.flip(0)), Dataset("d", Split(x, y), Split(x, y), 2, [0.5], [0.5], ["b", "a"])]
    assert d0 == data_digest(small(x.clone(), y.clone()))
    assert len({d0, *map(data_digest, others)}) == 4
