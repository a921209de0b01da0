"""Two real processes under paddle.distributed.launch read disjoint shards covering the data.

Run by pytest, it starts the launcher on this very file; under the launcher, the
`__main__` block below is each rank's program.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
N_IMAGES = 21  # odd: the second rank pads
EPOCHS = 2


def test_two_launched_ranks_get_disjoint_shards_covering_the_data(tmp_path):
    from test_data_loaders import write_images

    write_images(tmp_path, N_IMAGES)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
           "--log_dir", str(tmp_path / "log"), __file__, str(tmp_path)]
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    logs = "".join(p.read_text() for p in sorted((tmp_path / "log").glob("workerlog.*")))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + logs[-3000:]
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in range(2)]
    assert ranks[0]["steps"] == ranks[1]["steps"]
    for epoch in range(EPOCHS):
        a, b = (set(rk["labels"][epoch]) for rk in ranks)
        assert not a & b and a | b == set(range(N_IMAGES))
        assert len(ranks[0]["labels"][epoch]) + len(ranks[1]["labels"][epoch]) == N_IMAGES
    assert all(rk["total_seen"] == [N_IMAGES] * EPOCHS for rk in ranks)


def _rank_main(root: str) -> None:
    from ppdpn.config import DataConfig
    from ppdpn.data import build_loader
    from ppdpn.dist import all_reduce_sum, init_distributed

    ctx = init_distributed("cpu")
    cfg = DataConfig(image_root=root, batch_size=4, num_workers=1, image_size=16, resize_short=18)
    loader = build_loader(cfg, "train", ctx, seed=11)
    labels, total = [], []
    for epoch in range(EPOCHS):
        mine, steps = [], 0
        for _, lab, valid in loader.epoch(epoch):
            mine += lab.numpy()[valid.numpy() == 1].tolist()
            steps += 1
        assert steps == loader.steps_per_epoch
        labels.append(mine)
        total.append(int(all_reduce_sum([len(mine)])[0]))  # the ranks really are a group
    out = {"rank": ctx.rank, "steps": loader.steps_per_epoch, "labels": labels, "total_seen": total}
    Path(root, f"rank{ctx.rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    _rank_main(sys.argv[1])
