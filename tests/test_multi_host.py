"""The multi-node paths on separate hosts: a two-node Slurm cluster on network namespaces.

tests/net_hosts.py makes the hosts (own address, own host name resolving to 127.0.1.1 as
Debian's /etc/hosts has it, own /etc/hosts); tests/slurm_cluster.py runs slurmctld on
node0 and slurmd on both (NodeAddr = the host's address). Every job goes through the real
slurm/*.sbatch -> srun -> launch.sh on each node -> Paddle's launcher -> train.py, one CPU
process a node, on the tiny recipe of tests/conftest.py. The times in the comments were
measured on the 2-core CI machine.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from conftest import run_train, tiny_overrides
from net_hosts import NetHosts, netns_pids, our_namespaces, skip_unless_namespaces_work
from slurm_cluster import (SlurmCluster, assert_completed, install_slurm, read,
                           wait_for_checkpoint)

REPO = Path(__file__).resolve().parent.parent
STEPS_PER_EPOCH = 4   # 64 train images / (batch 8 x 2 ranks)
JOB_TIMEOUT = 240
# A node whose slurmd stops answering is declared down after SlurmdTimeout (default 300 s);
# 8 s keeps the node-death test short (lower risks a busy node being taken for dead).
# cred_expire etc. are in slurm_cluster.SLURM_CONF.
MULTI_HOST_CONF = "SlurmdTimeout=8"


def final_checkpoint(out_dir: Path) -> dict:
    from ppdpn.checkpoint import latest_checkpoint, load_checkpoint
    return load_checkpoint(latest_checkpoint(out_dir))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two hosts with Slurm on them; hosts, daemons and jobs gone afterwards (checked)."""
    skip_unless_namespaces_work()
    install_slurm()
    root = tmp_path_factory.mktemp("hosts")
    t0 = time.monotonic()
    with NetHosts(2, root) as net:
        slurm = SlurmCluster(root / "slurm", net.hosts, extra_conf=MULTI_HOST_CONF)
        slurm.net = net
        try:
            slurm.start()
            print(f"\n2-host slurm cluster up in {time.monotonic() - t0:.1f} s")
            yield slurm
        finally:
            slurm.stop()
    assert not net.leftovers()


def job_env(**extra) -> dict:
    # NPROC=1: one CPU process a node. RENDEZVOUS_TIMEOUT: fail in a minute, not five.
    # LAUNCH_LOG_LEVEL=INFO: the launchers' "Pod failed" and "Exit code" lines, timed.
    return {"PYTHON": sys.executable, "NPROC": "1", "RENDEZVOUS_TIMEOUT": "60",
            "LAUNCH_LOG_LEVEL": "INFO", **extra}


def submit_training(cluster, data, out, log, sbatch_args=(), env=None, **overrides) -> int:
    args = ["configs/demo.yaml", "-o"] + tiny_overrides(data, out, **overrides)
    return cluster.submit(REPO / "slurm/train_multi_node.sbatch", args, env=job_env(**(env or {})),
                          sbatch_args=sbatch_args, log=log, cwd=REPO)


def on_host(cluster, index: int, *cmd: str) -> str:
    host = cluster.hosts[index]
    return subprocess.run([*host.enter, *cmd], capture_output=True, text=True, timeout=60,
                          check=True).stdout.strip()


@pytest.fixture(scope="module")
def two_node_run(cluster, tiny_data, tmp_path_factory):
    """One uninterrupted 2-node job (2 epochs), and its wall time."""
    root = tmp_path_factory.mktemp("two_node")
    out, log = root / "out", root / "job.log"
    t0 = time.monotonic()
    job = submit_training(cluster, tiny_data, out, log)
    info = cluster.wait_done(job, JOB_TIMEOUT)
    return {"out": out, "log": log, "info": info, "seconds": time.monotonic() - t0}


def test_hosts_leave_nothing_behind_after_a_failure(tmp_path):
    """A test that fails with something still running on a host: the namespaces, their
    links, that process and the /etc/hosts mounts are all gone afterwards."""
    skip_unless_namespaces_work()
    with pytest.raises(RuntimeError, match="the test failed"):
        with NetHosts(3, tmp_path) as net:
            assert len({h.addr for h in net.hosts}) == 3
            stray = subprocess.Popen([*net.hosts[2].enter, "sleep", "600"])
            assert stray.pid in netns_pids(net.namespace(2))
            raise RuntimeError("the test failed")
    assert stray.wait(timeout=10) == -9
    assert net.leftovers() == [] and our_namespaces(net.prefix) == []
    assert "127.0.1.1\tnode" not in Path("/etc/hosts").read_text()  # only ever bind-mounted


def test_host_names_resolve_to_loopback_as_on_debian(cluster):
    """What Paddle's launcher takes as its own address when not told (context/node.py:
    gethostbyname(getfqdn(hostname))) is 127.0.1.1 on every host: no peer can reach it."""
    probe = "import socket; print(socket.gethostbyname(socket.getfqdn(socket.gethostname())))"
    for i, host in enumerate(cluster.hosts):
        assert on_host(cluster, i, "hostname") == host.name
        assert on_host(cluster, i, sys.executable, "-c", probe) == "127.0.1.1"
    # ...while the other host's name resolves to its real address.
    assert on_host(cluster, 1, "getent", "ahostsv4", "node0").split()[0] == cluster.hosts[0].addr


def test_two_node_job_equals_two_processes_on_one_host(cluster, two_node_run, tiny_data,
                                                       tmp_path):
    out, log = two_node_run["out"], two_node_run["log"]
    assert_completed(two_node_run["info"], log)
    text = read(log)
    node0, node1 = (h.addr for h in cluster.hosts)
    port = re.search(rf"rendezvous at {re.escape(node0)}:(\d+) \(node0\), 2 node\(s\)", text)
    assert port, f"no rendezvous on node 0's address in the log\n{text[-4000:]}"
    for rank, addr in ((0, node0), (1, node1)):
        assert (f"launch.sh: node {rank}/2 at {addr} (eth0), rendezvous on node 0 at "
                f"{node0}:{port.group(1)}") in text, text[-4000:]
    print(f"\n2-node job (2 epochs, 8 steps): {two_node_run['seconds']:.1f} s")

    # The reference: one launcher, 2 processes, on this machine.
    ref = tmp_path / "ref"
    run_train(["-c", "configs/demo.yaml", "-o"] + tiny_overrides(tiny_data, ref), nproc=2,
              log_dir=ref / "launch")
    a, b = final_checkpoint(ref), final_checkpoint(out)
    assert a["global_step"] == b["global_step"] == 2 * STEPS_PER_EPOCH
    assert b["world_size"] == 2
    for k, v in a["model"].items():
        np.testing.assert_array_equal(v, b["model"][k], err_msg=k)


def test_eval_job_on_two_nodes_counts_every_image_once(cluster, two_node_run, tiny_data, tmp_path):
    assert_completed(two_node_run["info"], two_node_run["log"])
    run_dir, log = two_node_run["out"], tmp_path / "eval.log"
    args = ["configs/demo.yaml", run_dir, "-o"] + tiny_overrides(tiny_data, tmp_path / "eval_out")
    job = cluster.submit(REPO / "slurm/eval.sbatch", args, env=job_env(),
                         sbatch_args=["--nodes=2"], log=log, cwd=REPO)
    info = cluster.wait_done(job, JOB_TIMEOUT)
    assert_completed(info, log)
    assert info["NodeList"] == "node[0-1]"
    metrics = json.loads(read(log).strip().splitlines()[-1])
    assert metrics["images"] == 24  # 4 classes x 6 val images, none twice, none left out
    rows = [json.loads(line) for line in read(run_dir / "metrics.jsonl").splitlines()]
    assert metrics["top1"] == pytest.approx(rows[-1]["eval_top1"], abs=1e-9)
    # Node 1's process took part: it printed the same (all-reduced) metrics as rank 1 of 2.
    node1 = read(tmp_path / "eval_out/log/node1/workerlog.0")
    assert json.loads(node1.strip().splitlines()[-1]) == metrics
    assert "PADDLE_TRAINER_ID=1\n" in read(tmp_path / "eval_out/log/node1/envlog.0")


def test_unreachable_rendezvous_fails_fast_naming_the_address(cluster, tiny_data, tmp_path):
    """MASTER_ADDR that no host answers (node 0 down, or a wrong address): the job fails
    within RENDEZVOUS_TIMEOUT naming the address, instead of Paddle's endless wait."""
    out, log = tmp_path / "out", tmp_path / "job.log"
    nowhere = cluster.hosts[0].addr.rsplit(".", 1)[0] + ".200"
    t0 = time.monotonic()
    job = submit_training(cluster, tiny_data, out, log,
                          env={"MASTER_ADDR": nowhere, "RENDEZVOUS_TIMEOUT": "5"})
    info = cluster.wait_done(job, 120)
    seconds = time.monotonic() - t0
    text = read(log)
    assert info["JobState"] == "FAILED", text[-3000:]
    assert re.search(rf"node 1 \({re.escape(cluster.hosts[1].addr)}\) cannot reach the "
                     rf"rendezvous on node 0 at {re.escape(nowhere)}:\d+ after 5 s", text), text
    assert f"MASTER_ADDR={nowhere} is not its address" in text  # node 0 says so at once
    assert seconds < 45, f"took {seconds:.0f} s"  # 15-20 s measured; a hang would never end
    print(f"\nunreachable rendezvous: job failed after {seconds:.1f} s (RENDEZVOUS_TIMEOUT=5)")
    assert not (out / "checkpoints").exists()


def progress_step(train_log: str) -> int:
    """The global step of the last progress line ("epoch E/N step S/M ...") so far."""
    found = re.findall(r"\bepoch (\d+)/\d+ step (\d+)/(\d+) ", train_log)
    epoch, step, per_epoch = map(int, found[-1]) if found else (1, 0, 1)
    return (epoch - 1) * per_epoch + step


def usr1_stop_and_requeue(cluster, job: int, out: Path, log: Path, total: int) -> int:
    """--signal=B:USR1@N: the batch shell forwards it through srun to both nodes' launch.sh;
    both ranks stop at the same step, rank 0 checkpoints once, both launchers exit 75, and
    the job requeues itself and runs again on the same two nodes. Returns the step."""
    wait_for_checkpoint(cluster, job, out)
    first = cluster.job(job)
    cluster.signal_batch(job, "USR1")
    t0 = time.monotonic()
    requeued = cluster.wait_state(job, {"PENDING", "REQUEUED", "COMPLETED", "FAILED"}, 60)
    stopped_after = time.monotonic() - t0
    assert requeued["JobState"] in ("PENDING", "REQUEUED"), \
        f"not requeued: {requeued['JobState']} {requeued['ExitCode']}\n{read(log)[-4000:]}"
    again = cluster.wait_state(job, "RUNNING", 120)
    print(f"\nUSR1 -> requeued in {stopped_after:.1f} s, running again after "
          f"{time.monotonic() - t0:.1f} s")
    assert first["NodeList"] == again["NodeList"] == "node[0-1]" and again["Restarts"] == "1"

    text, train_log = read(log), read(out / "train.log")
    stopped = re.search(r"\[run\] stopped by (SIGUSR1|a signal to another rank) at step (\d+)",
                        train_log)
    assert stopped, f"no stop on SIGUSR1 in the log\n{train_log[-4000:]}"
    step = int(stopped.group(2))
    assert 0 < step < total
    assert len(re.findall(r"LAUNCH INFO .* Exit code 75", text)) == 2, text[-4000:]
    # The stop's checkpoint, written once (by rank 0, not once a node).
    saves = re.findall(rf"\[checkpoint\] \S+ckpt-{step:08d}\.pdckpt \((SIGUSR1|a signal to "
                       rf"another rank)\)", train_log)
    assert len(saves) == 1, train_log[-4000:]
    return step


def kill_host_1_mid_run(cluster, job: int, out: Path, log: Path, after_step: int) -> int:
    """SIGKILL every process of host 1 (slurmd, srun's task, launcher, training) once the
    run is past `after_step`; the job must end within a bound, not sit in a collective.
    Host 1 then comes back (slurmd restarted). Returns the last step seen before the kill."""
    deadline = time.monotonic() + 120
    while progress_step(read(out / "train.log")) <= after_step:
        assert time.monotonic() < deadline, f"no progress\n{read(log)[-3000:]}"
        assert cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), read(log)[-3000:]
        time.sleep(0.2)
    reached = progress_step(read(out / "train.log"))
    killed_at = datetime.now()
    assert cluster.net.kill_host(1), "nothing ran on host 1"
    t0 = time.monotonic()
    state = cluster.wait_state(job, {"PENDING", "REQUEUED", "COMPLETED", "FAILED", "NODE_FAIL",
                                     "CANCELLED"}, 120)
    ended_after = time.monotonic() - t0
    # Node 0's launcher saw its training process fail (gloo: the peer's connections closed).
    failed = re.findall(r"LAUNCH INFO (\S+ \S+) Pod failed", read(log))
    assert failed, read(log)[-4000:]
    stopped_after = (datetime.strptime(failed[-1], "%Y-%m-%d %H:%M:%S,%f")
                     - killed_at).total_seconds()
    assert stopped_after > 0, "no failure after the kill"
    print(f"host 1 killed at step {reached}: training on node 0 failed after "
          f"{stopped_after:.1f} s, job {state['JobState']} after {ended_after:.1f} s")
    assert stopped_after < 35  # gloo's own timeout in a collective is ~30 s
    assert ended_after < 60    # Slurm: SlurmdTimeout=8 here, 300 s by default
    cluster.start_slurmd(cluster.hosts[1])
    assert state["JobState"] in ("PENDING", "REQUEUED"), "Slurm did not requeue after NODE_FAIL"
    return reached


def test_usr1_requeue_then_node_death_resume_to_the_uninterrupted_step_count(
        cluster, tiny_data, tmp_path):
    """One 2-node job preempted (USR1 at the time limit) and later hit by the death of a
    node: it resumes each time, losing no step to the first and at most Global.save_steps
    to the second, and ends at the step count of an uninterrupted job."""
    epochs, save_steps = 3, 2
    total = epochs * STEPS_PER_EPOCH
    out, log = tmp_path / "out", tmp_path / "job.log"
    job = submit_training(cluster, tiny_data, out, log, **{
        "Global.epochs": epochs, "Global.print_interval": 1, "Global.save_steps": save_steps})
    t0 = time.monotonic()
    step = usr1_stop_and_requeue(cluster, job, out, log, total)
    reached = kill_host_1_mid_run(cluster, job, out, log, after_step=step + save_steps)
    info = cluster.wait_done(job, JOB_TIMEOUT)
    assert_completed(info, log)
    print(f"job done {time.monotonic() - t0:.1f} s after the USR1")
    assert info["Restarts"] == "2" and info["NodeList"] == "node[0-1]"
    assert "SLURM_RESTART_COUNT=1" in read(log) and "SLURM_RESTART_COUNT=2" in read(log)

    resumed = [int(s) for s in re.findall(r"\[resume\] .*global step (\d+)",
                                          read(out / "train.log"))]
    assert len(resumed) == 2 and resumed[0] == step, read(out / "train.log")[-4000:]
    assert reached - save_steps <= resumed[1] <= reached
    assert final_checkpoint(out)["global_step"] == total
    steps = [json.loads(line)["global_step"] for line in read(out / "metrics.jsonl").splitlines()]
    # Every epoch's record (one may come twice: steps lost to the node death are run again).
    assert sorted(set(steps)) == [STEPS_PER_EPOCH * (e + 1) for e in range(epochs)]
