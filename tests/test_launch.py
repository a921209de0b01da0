"""launch.sh: checks before anything starts, the launcher command it builds, and a
two-node run on loopback (two launch.sh, one per "node") that stops on SIGUSR1.

Most tests use a stand-in PYTHON that records its calls and prints an output dir, so
they check launch.sh's own logic in milliseconds; the config check and the two-node
run use the real interpreter.
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch.sh"


@pytest.fixture(scope="module")
def no_gpu_path(tmp_path_factory) -> str:
    """PATH with an nvidia-smi that finds no GPU, as on a machine without a driver."""
    bin_dir = tmp_path_factory.mktemp("bin")
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed: no driver' >&2\nexit 9\n")
    smi.chmod(0o755)
    return f"{bin_dir}:/usr/bin:/bin"


@pytest.fixture
def stub_python(tmp_path) -> Path:
    """An interpreter stand-in: logs its arguments, prints an output dir (the config check)."""
    calls = tmp_path / "python_calls"
    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho {tmp_path}/out\n')
    stub.chmod(0o755)
    return stub


def run_launch(args, path, env=None, python=None, timeout=60) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if k not in ("CUDA_VISIBLE_DEVICES", "NPROC", "NNODES", "NODE_RANK",
                         "MASTER_ADDR", "MASTER_PORT", "LOG_DIR", "DRY_RUN")}
    base["PYTHON"] = str(python or sys.executable)
    base["PATH"] = path
    return subprocess.run(["bash", str(LAUNCH), *map(str, args)], env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def launcher_argv(proc) -> list:
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout.strip().splitlines()[-1])


def flag(argv, name):
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize("env, message", [
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "127.0.0.1"},
     "NODE_RANK=2 must be below NNODES=2"),
    ({"NNODES": "0"}, "NNODES=0 must be a whole number >= 1"),
    ({"NNODES": "two"}, "NNODES=two must be a whole number"),
    ({"NODE_RANK": "-1"}, "NODE_RANK=-1 must be a whole number"),
    ({"NPROC": "0"}, "NPROC=0 must be a whole number >= 1"),
    ({"NNODES": "2", "NODE_RANK": "1"}, "needs MASTER_ADDR"),
    ({"NNODES": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "70000"}, "MASTER_PORT=70000"),
    ({"CUDA_VISIBLE_DEVICES": "0,1", "NPROC": "4"}, "NPROC=4 but only 2 GPU(s)"),
    ({"NNODES": "2", "MASTER_ADDR": "node0"}, "MASTER_ADDR=node0 must be node 0's IPv4 address"),
    ({"NNODES": "2", "MASTER_ADDR": "10.0.0.1", "NODE_ADDR": "node1"},
     "NODE_ADDR=node1 must be an IPv4 address"),
    ({"NNODES": "2", "MASTER_ADDR": "10.0.0.1", "RENDEZVOUS_TIMEOUT": "0"},
     "RENDEZVOUS_TIMEOUT=0 must be a whole number >= 1"),
    # Node 0 serves the rendezvous: MASTER_ADDR must be its own address.
    ({"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "10.0.0.1", "NODE_ADDR": "10.0.0.2",
      "GLOO_SOCKET_IFNAME": "eth0"}, "MASTER_ADDR=10.0.0.1 is not its address (NODE_ADDR=10.0.0.2)"),
])
def test_impossible_settings_fail_before_anything_starts(stub_python, no_gpu_path, tmp_path, env,
                                                        message):
    proc = run_launch(["configs/demo.yaml"], no_gpu_path, env=env, python=stub_python)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "python_calls").exists(), "something was started"


def test_missing_config_fails_before_anything_starts(stub_python, no_gpu_path, tmp_path):
    proc = run_launch(["configs/no_such_recipe.yaml"], no_gpu_path, python=stub_python)
    assert proc.returncode == 2
    assert "config file not found: configs/no_such_recipe.yaml" in proc.stderr
    assert not (tmp_path / "python_calls").exists()


def test_bad_override_is_reported_by_key_before_the_launcher_starts(no_gpu_path, tmp_path):
    out = tmp_path / "out"
    proc = run_launch(["configs/demo.yaml", "-o", f"Global.output_dir={out}", "Global.epoch=3"],
                      no_gpu_path)
    assert proc.returncode == 2
    assert "unknown key Global.epoch" in proc.stderr
    assert not out.exists(), "the launcher ran"


def test_dry_run_on_cpu_checks_the_real_config(no_gpu_path, tmp_path):
    out = tmp_path / "out"
    argv = launcher_argv(run_launch(
        ["configs/demo.yaml", "-o", f"Global.output_dir={out}", "-o", "Global.epochs=3"],
        no_gpu_path,
        env={"DRY_RUN": "1", "CUDA_VISIBLE_DEVICES": ""}))
    assert argv[:3] == [sys.executable, "-m", "ppdpn.launch"]
    assert flag(argv, "--nproc_per_node") == "2"  # CPU default
    assert flag(argv, "--log_dir") == f"{out}/log"
    assert "--devices" not in argv and "--nnodes" not in argv
    train = argv.index(str(REPO / "train.py"))
    assert argv[train + 1:] == ["-c", "configs/demo.yaml", "-o", f"Global.output_dir={out}",
                                "-o", "Global.epochs=3"]
    assert not out.exists()


@pytest.mark.parametrize("env, nproc", [
    ({}, "2"),
    ({"NPROC": "3"}, "3"),
    ({"CUDA_VISIBLE_DEVICES": ""}, "2"),
    ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, "2"),
    ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, "3"),
    ({"CUDA_VISIBLE_DEVICES": "2,3,4,5", "NPROC": "2"}, "2"),
])
def test_process_count_follows_visible_gpus(stub_python, no_gpu_path, env, nproc):
    argv = launcher_argv(run_launch(["configs/demo.yaml"], no_gpu_path, env={"DRY_RUN": "1", **env},
                                    python=stub_python))
    assert flag(argv, "--nproc_per_node") == nproc


def test_gpus_are_counted_with_nvidia_smi(stub_python, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + "".join(
        f"echo 'GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})'\n" for i in range(4)))
    smi.chmod(0o755)
    argv = launcher_argv(run_launch(["configs/demo.yaml"], f"{bin_dir}:/usr/bin:/bin",
                                    env={"DRY_RUN": "1"}, python=stub_python))
    assert flag(argv, "--nproc_per_node") == "4"


def test_multi_node_flags_and_per_node_log_dir(stub_python, no_gpu_path, tmp_path):
    env = {"DRY_RUN": "1", "NNODES": "4", "NODE_RANK": "3", "MASTER_ADDR": "10.1.2.3",
           "MASTER_PORT": "29400", "NODE_ADDR": "10.1.2.4", "GLOO_SOCKET_IFNAME": "eth0"}
    argv = launcher_argv(run_launch(["configs/demo.yaml"], no_gpu_path, env=env,
                                    python=stub_python))
    assert flag(argv, "--nnodes") == "4"
    assert flag(argv, "--master") == "10.1.2.3:29400"
    assert flag(argv, "--rank") == "3"
    assert flag(argv, "--log_dir") == f"{tmp_path}/out/log/node3"
    assert flag(argv, "--host") == "10.1.2.4"  # the launcher's own address: NODE_ADDR
    argv = launcher_argv(run_launch(["configs/demo.yaml"], no_gpu_path, python=stub_python,
                                    env={**env, "LOG_DIR": str(tmp_path / "logs")}))
    assert flag(argv, "--log_dir") == str(tmp_path / "logs")


def test_node_address_defaults_to_the_route_towards_the_master(no_gpu_path):
    """Without NODE_ADDR the launcher gets --host = this node's source address towards
    MASTER_ADDR (not what its host name resolves to), and gloo that address's interface."""
    proc = run_launch(["configs/demo.yaml"], no_gpu_path, env={
        "DRY_RUN": "1", "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1"})
    argv = launcher_argv(proc)
    assert flag(argv, "--host") == "127.0.0.1"
    assert flag(argv, "--master") == "127.0.0.1:6170"
    assert ("node 1/2 at 127.0.0.1 (lo), rendezvous on node 0 at 127.0.0.1:6170"
            in proc.stderr)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback_train_together_and_stop_on_usr1(tmp_path):
    """Two launch.sh with NNODES=2 (one process each) meet at MASTER_ADDR:MASTER_PORT;
    SIGUSR1 to both (what srun does on a cluster) checkpoints and exits 75 on both."""
    data, out = tmp_path / "data", tmp_path / "out"
    subprocess.run([sys.executable, "-m", "data.make_demo", "--out", str(data),
                    "--train-per-class", "16", "--val-per-class", "4"],
                   cwd=REPO, check=True, capture_output=True, timeout=120)
    base = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    base.update(PYTHON=sys.executable, NNODES="2", NPROC="1", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(_free_port()), LAUNCH_LOG_LEVEL="INFO")  # "Host ip reset"
    args = ["bash", str(LAUNCH), "configs/demo.yaml", "-o", f"Global.output_dir={out}",
            f"DataLoader.image_root={data}", "Global.epochs=50"]
    nodes = [subprocess.Popen(args, env={**base, "NODE_RANK": str(rank)}, cwd=REPO,
                              stdout=open(tmp_path / f"node{rank}.log", "w"),
                              stderr=subprocess.STDOUT)
             for rank in (0, 1)]
    try:
        deadline = time.monotonic() + 120
        while not list((out / "checkpoints").glob("ckpt-*.json")):
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            assert all(n.poll() is None for n in nodes), "a node exited early"
            time.sleep(0.2)
        for n in nodes:
            n.send_signal(signal.SIGUSR1)
        codes = [n.wait(timeout=90) for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
    logs = "".join((tmp_path / f"node{r}.log").read_text() for r in (0, 1))
    assert codes == [75, 75], logs[-4000:]
    assert "rank 0/2" in logs
    # Each launcher was given its own address (--host), not its host name's.
    assert logs.count("Host ip reset to 127.0.0.1") == 2, logs[-4000:]
    assert (out / "log/node0/workerlog.0").exists() and (out / "log/node1/workerlog.0").exists()
    from ppdpn.checkpoint import latest_checkpoint, load_checkpoint
    ckpt = load_checkpoint(latest_checkpoint(out))
    assert ckpt["world_size"] == 2
    assert 3 <= ckpt["global_step"] < 50 * 3
