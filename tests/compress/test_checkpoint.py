import pytest
import torch

from compress.checkpoint import CheckpointError, atomic_write, load_into, read_state_dict, save_weights
from compress.models import build_model


def test_safetensors_roundtrip_and_atomic(tmp_path):
    m = build_model("resnet_tiny", 10, 1)
    save_weights(m, tmp_path / "w.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o044  # readable by others, as with open()
    m2 = build_model("resnet_tiny", 10, 1)
    load_into(m2, read_state_dict(tmp_path / "w.safetensors"), "w")
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(m.eval()(x), m2.eval()(x))


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")

    def boom(p):
        p.write_text("half")
        raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_pickled_module_is_refused(tmp_path):
    torch.save(build_model("resnet_tiny", 10, 1), tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match="module.pt: cannot load with weights_only=True"):
        read_state_dict(tmp_path / "module.pt")


def test_state_dict_pt_and_mismatch_message(tmp_path):
    torch.save({"state_dict": build_model("resnet_tiny", 10, 1).state_dict()}, tmp_path / "s.pt")
    sd = read_state_dict(tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match=r"teacher.checkpoint=s.pt: does not fit.*shape mismatch: stem.0.weight"):
        load_into(build_model("resnet8", 10, 1), sd, "teacher.checkpoint=s.pt")
    with pytest.raises(CheckpointError, match="nope.pt: checkpoint file not found"):
        read_state_dict(tmp_path / "nope.pt")
