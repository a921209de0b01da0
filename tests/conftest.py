"""Shared fixtures: a tiny demo data set made once per session, and a train.py runner."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ppdpn.gpu_check import last_json  # noqa: F401  (one parser for the tests and the check)

ROOT = Path(__file__).resolve().parents[1]
# PaddleClas's published state_dicts, key and shape per line (docs/reference.md section 4).
TSV_DIR = ROOT / "tests" / "data" / "paddleclas_state_dicts"


def read_tsv(name):
    """[(key, shape as a list)] of PaddleClas's published state_dict of model `name`."""
    path = TSV_DIR / f"{name}.tsv"
    rows = [line.rstrip("\n").split("\t") for line in path.open() if not line.startswith("#")]
    return [(key, [int(d) for d in shape.split("x")]) for key, shape in rows]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """4 classes x 16 train / 6 val images of the demo generator (a few seconds)."""
    out = tmp_path_factory.mktemp("tiny_data")
    subprocess.run([sys.executable, "-m", "data.make_demo", "--out", str(out), "--classes", "4",
                    "--train-per-class", "16", "--val-per-class", "6", "--seed", "3"],
                   cwd=ROOT, check=True, capture_output=True)
    return out


def tiny_overrides(data_dir, out_dir, **extra):
    """The demo recipe shrunk to seconds: DenseNetTiny, 32 px, batch 8."""
    o = {"Global.output_dir": out_dir, "DataLoader.image_root": data_dir,
         "Arch.name": "DenseNetTiny", "Arch.class_num": 4, "DataLoader.image_size": 32,
         "DataLoader.resize_short": 36, "DataLoader.batch_size": 8, "Global.epochs": 2,
         "Global.print_interval": 2, "Global.deterministic": True,
         "Optimizer.lr.warmup_epoch": 0, "Optimizer.lr.learning_rate": 0.05}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def run_train(args, nproc=1, log_dir=None, timeout=300, env=None, check=True):
    """Run train.py (through the launcher when nproc > 1); return the CompletedProcess."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc),
               "--log_dir", str(log_dir), "train.py"] + args
    else:
        cmd = [sys.executable, "train.py"] + args
    full_env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    full_env.update(env or {})
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        logs = ""
        if log_dir and Path(log_dir).is_dir():
            logs = "\n".join(p.read_text()[-3000:] for p in sorted(Path(log_dir).glob("workerlog.*")))
        raise AssertionError(f"train.py exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                             f"STDERR:\n{proc.stderr[-4000:]}\n{logs}")
    return proc


def start_launcher(args, log_dir, nproc=2):
    """paddle.distributed.launch with train.py in the background (CPU processes)."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    return subprocess.Popen([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node",
                             str(nproc), "--log_dir", str(log_dir), "train.py"] + args, cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def worker_pids(launcher_pid, nproc=2, timeout=60):
    """{rank: pid} of the train.py workers under a launcher, once all have started."""
    import time

    from launcher import launcher_workers
    deadline = time.time() + timeout
    while time.time() < deadline:
        kids = launcher_workers(launcher_pid)
        if len(kids) == nproc:
            return kids
        time.sleep(0.1)
    raise AssertionError("workers did not start")


def twin_models(name, seed=1, **kwargs):
    """A tiny model (10 classes) and a copy with the same weights built with other options."""
    import paddle

    from ppdpn.models import create_model
    paddle.seed(seed)
    plain = create_model(name, num_classes=10)
    other = create_model(name, num_classes=10, **kwargs)
    other.set_state_dict(plain.state_dict())
    return plain, other
