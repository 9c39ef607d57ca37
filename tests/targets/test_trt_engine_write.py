"""The TensorRT engine file is written atomically (TensorRT is not installed here: a fake
serialized engine, any object with the buffer protocol as TensorRT's IHostMemory has, stands in)."""
from pathlib import Path

import numpy as np
import pytest

from targets.tensorrt import write_engine


def test_the_engine_bytes_are_written_whole(tmp_path):
    fake = np.frombuffer(b"\x00ENGINE" * 1000, dtype=np.uint8)  # IHostMemory-like: a buffer, not bytes
    path = write_engine(tmp_path / "m.engine", fake)
    assert path.read_bytes() == b"\x00ENGINE" * 1000
    assert [p.name for p in tmp_path.iterdir()] == ["m.engine"]  # no temp file left behind


def test_a_write_cut_short_leaves_the_previous_engine_and_no_partial_file(tmp_path, monkeypatch):
    write_engine(tmp_path / "m.engine", bytearray(b"old engine"))
    real = Path.write_bytes

    def disk_full(self, data):  # half the bytes reach the disk, then the write fails
        real(self, bytes(data)[:len(data) // 2])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_engine(tmp_path / "m.engine", bytearray(b"new engine, longer than the old one"))
    assert (tmp_path / "m.engine").read_bytes() == b"old engine"
    assert [p.name for p in tmp_path.iterdir()] == ["m.engine"]
