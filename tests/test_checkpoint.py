"""The checkpoint format: atomic, verified, pruned, and optimizer state keyed by structure."""
import json
import os
import pickle

import numpy as np
import paddle
import pytest

from ppdpn.checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints,
                              load_checkpoint, load_optimizer_state, optimizer_state,
                              save_checkpoint, verify_checkpoint)


def _state(step, value=1.0):
    return {"model": {"w": np.full((3, 3), value, np.float32)}, "global_step": step, "epoch": 0}


def test_save_prunes_to_keep_last_and_points_latest(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(_state(step, step), tmp_path, keep_last=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["ckpt-00000030.pdckpt", "ckpt-00000040.pdckpt"]
    assert (tmp_path / "latest").read_text() == "ckpt-00000040.pdckpt"
    assert load_checkpoint(tmp_path)["model"]["w"][0, 0] == 40.0
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_best_is_kept_besides_the_last(tmp_path):
    save_checkpoint(_state(1, 1.0), tmp_path, keep_last=1, is_best=True)
    save_checkpoint(_state(2, 2.0), tmp_path, keep_last=1)
    assert load_checkpoint(tmp_path / "best.pdckpt")["model"]["w"][0, 0] == 1.0


@pytest.mark.parametrize("damage", ["truncate", "overwrite", "no_record"])
def test_torn_checkpoint_is_detected_and_resume_falls_back(tmp_path, damage):
    save_checkpoint(_state(1, 1.0), tmp_path, keep_last=3)
    newest = save_checkpoint(_state(2, 2.0), tmp_path, keep_last=3)
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "overwrite":
        newest.write_bytes(data[:100] + bytes(50) + data[150:])
    else:
        newest.with_suffix(".json").unlink()
    assert verify_checkpoint(newest) is not None
    with pytest.raises(CheckpointError, match=newest.name):
        load_checkpoint(newest)
    logged = []
    assert latest_checkpoint(tmp_path, log=logged.append).name == "ckpt-00000001.pdckpt"
    assert newest.name in logged[0]


def test_failed_write_names_the_path_and_keeps_earlier_checkpoints(tmp_path):
    good = save_checkpoint(_state(1), tmp_path, keep_last=3)
    os.chmod(tmp_path, 0o500)
    try:
        if os.access(tmp_path, os.W_OK):  # root ignores permissions: use an impossible path
            target = tmp_path / "latest" / "sub"
        else:
            target = tmp_path
        with pytest.raises(CheckpointError, match=str(target)):
            save_checkpoint(_state(2), target, keep_last=1)
    finally:
        os.chmod(tmp_path, 0o700)
    assert verify_checkpoint(good) is None


def test_loading_refuses_code_in_the_pickle(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import hashlib
    data = pickle.dumps({"model": Evil(), "global_step": 1})
    path = tmp_path / "ckpt-00000001.pdckpt"  # a crafted file with a matching record
    path.write_bytes(data)
    path.with_suffix(".json").write_text(json.dumps(
        {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}))
    with pytest.raises(Exception, match="system"):
        load_checkpoint(path)
    with pytest.raises(Exception, match="system"):
        load_checkpoint(tmp_path)
    assert not marker.exists()


def test_optimizer_state_survives_other_layer_creation_orders():
    paddle.seed(0)
    net = paddle.nn.Sequential(paddle.nn.Linear(4, 3), paddle.nn.BatchNorm1D(3))
    opt = paddle.optimizer.Momentum(0.1, parameters=net.parameters())
    net(paddle.randn([8, 4])).mean().backward()
    opt.step()
    saved = optimizer_state(opt, net)
    assert all(not k.startswith("linear_") for k in saved)
    paddle.nn.Linear(2, 2)  # shifts Paddle's generated parameter names
    net2 = paddle.nn.Sequential(paddle.nn.Linear(4, 3), paddle.nn.BatchNorm1D(3))
    opt2 = paddle.optimizer.Momentum(0.1, parameters=net2.parameters())
    load_optimizer_state(opt2, net2, saved)
    again = optimizer_state(opt2, net2)
    assert set(again) == set(saved)
    for k, v in saved.items():
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(again[k], v)
