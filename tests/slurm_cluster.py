"""A real Slurm cluster for the tests: one node on 127.0.0.1 (the `slurm` session fixture),
or one node per network-namespace host of tests/net_hosts.py (`SlurmCluster(root, hosts)`).

Debian's slurmctld/slurmd/munge (installed with apt-get when missing) run as root from a
temp dir: their own slurm.conf (reached through SLURM_CONF, /etc is not touched), munge
key and socket, state, spool, pid and log files. Settings follow docs/reference.md §8's Slurm
section, which measured what a loopback cluster needs. Without slurmdbd, job state comes
from `scontrol show job`, which keeps a finished job for MinJobAge seconds.

    from slurm_cluster import slurm  # noqa: F401  (the fixture)

    def test_x(slurm):
        job = slurm.submit("slurm/train_single_node.sbatch", ["configs/demo.yaml"], log=path)
        info = slurm.wait_done(job, timeout=120)
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence

import pytest

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "munged"]
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
            "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
NODE_CPUS = 2        # what the node offers to jobs; the CI machines have 2 cores
NODE_MEMORY_MB = 2000  # must not exceed the machine's, or slurmd is refused
MEM_PER_CPU_MB = 500  # DefMemPerCPU: without it one job takes the node's whole memory

SLURM_CONF = """\
ClusterName=ppdpntest
SlurmctldHost={ctld_name}({ctld_addr})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
{comm_params}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job may start again after ~15 s instead of ~120 s.
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# pgid: linuxproc leaves orphans behind; cgroup needs a writable cgroup tree.
ProctrackType=proctrack/pgid
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU={mem_per_cpu}
JobRequeue=1
KillWait=5
MinJobAge=600
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
{extra}
{node_lines}
PartitionName=debug Nodes={node_names} Default=YES MaxTime=INFINITE State=UP
"""
NODE_LINE = "NodeName={name} NodeAddr={addr} CPUs={cpus} RealMemory={memory} State=UNKNOWN"
# On 127.0.0.1 only, not 0.0.0.0: the one-node cluster shares the machine's network.
# Hosts in network namespaces bind to any address of their own namespace.
LOOPBACK_BINDING = "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny"


@dataclass(frozen=True)
class Host:
    """A node of the cluster: its Slurm name (= host name), address, and the command
    prefix that runs a program on it (empty: this machine as it is)."""
    name: str
    addr: str
    enter: tuple = ()


LOOPBACK = Host("localhost", "127.0.0.1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _missing_binaries(binaries: Sequence[str]) -> list:
    return [b for b in binaries if shutil.which(b) is None
            and not Path("/usr/sbin", b).exists()]


def apt_install(what: str, packages: Sequence[str], binaries: Sequence[str]) -> float:
    """apt-get install `packages` when one of `binaries` is missing; seconds it took.

    Skips the calling test session (naming the failure) only when they cannot be
    installed; everything after installation fails loudly instead.
    """
    if not _missing_binaries(binaries):
        return 0.0
    if shutil.which("apt-get") is None:
        pytest.skip(f"{what} is not installed ({', '.join(_missing_binaries(binaries))} "
                    f"missing) and apt-get is not available")
    if os.geteuid() != 0:
        pytest.skip(f"{what} is not installed and installing it with apt-get needs root")
    start = time.monotonic()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"],
                ["apt-get", "install", "-y", "--no-install-recommends", *packages]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            pytest.skip(f"cannot install {what}: `{' '.join(cmd)}` exited {proc.returncode}: "
                        f"{(proc.stderr or proc.stdout).strip()[-500:]}")
    missing = _missing_binaries(binaries)
    if missing:  # installed, yet absent: our package list is wrong, a failure
        pytest.fail(f"apt-get installed {packages} but {missing} are still missing")
    return time.monotonic() - start


def install_slurm() -> float:
    """The Slurm and munge packages, installed when missing; seconds it took."""
    return apt_install("Slurm", PACKAGES, BINARIES)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A daemon that exited but is not reaped yet is a zombie: count it as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


def _stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if `pid` is still there after `timeout` seconds."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 2.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                return
            time.sleep(0.1)


class SlurmCluster:
    """Start, use and stop the cluster living in `root`: slurmctld on hosts[0], slurmd on
    every host, one munged on this machine (its socket is a file every host sees)."""

    def __init__(self, root: Path, hosts: Sequence[Host] = (LOOPBACK,), extra_conf: str = ""):
        self.root = Path(root)
        self.hosts = list(hosts)
        self.extra_conf = extra_conf
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.env: Dict[str, str] = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.start_seconds: Optional[float] = None
        self.install_seconds: float = 0.0
        self._jobs: list = []

    # ------------------------------------------------------------ life cycle
    def start(self, timeout: float = 60.0) -> None:
        t0 = time.monotonic()
        (self.root / "state").mkdir(parents=True)
        for host in self.hosts:  # slurmd does not create %n
            (self.root / "spool" / host.name).mkdir(parents=True)
        self._start_munge()
        self.conf.write_text(self._slurm_conf())
        self._run_daemon(["slurmctld", "-f", str(self.conf)], "slurmctld", self.hosts[0])
        for host in self.hosts:
            self.start_slurmd(host)
        self.wait_idle(timeout)
        self.start_seconds = time.monotonic() - t0

    def _slurm_conf(self) -> str:
        loopback = self.hosts == [LOOPBACK]
        nodes = [NODE_LINE.format(name=h.name, addr=h.addr, cpus=NODE_CPUS,
                                  memory=NODE_MEMORY_MB) for h in self.hosts]
        return SLURM_CONF.format(
            ctld_name=self.hosts[0].name, ctld_addr=self.hosts[0].addr,
            comm_params=LOOPBACK_BINDING if loopback else "", extra=self.extra_conf,
            node_lines="\n".join(nodes), node_names=",".join(h.name for h in self.hosts),
            root=self.root, mem_per_cpu=MEM_PER_CPU_MB,
            munge_socket=self.munge_dir / "munge.socket",
            ctld_port=_free_port(), slurmd_port=_free_port())

    def start_slurmd(self, host: Host) -> None:
        self._run_daemon(["slurmd", "-f", str(self.conf), "-N", host.name], "slurmd", host)

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Until every node is idle (up, and running no job)."""
        names = ",".join(h.name for h in self.hosts)
        deadline = time.monotonic() + timeout
        states = []
        while time.monotonic() < deadline:
            proc = self.run(["sinfo", "-h", "-N", "-n", names, "-o", "%T"], check=False)
            states = proc.stdout.split()
            if len(states) == len(self.hosts) and set(states) == {"idle"}:
                return
            time.sleep(0.2)
        raise RuntimeError(f"nodes {names} not idle after {timeout:.0f} s (sinfo says {states})\n"
                           + self.daemon_logs())

    def _start_munge(self) -> None:
        # munged wants its socket dir 755 and the key 600. --force: pytest's temp dirs
        # are 700, and munged refuses a socket that not everyone could reach; root, the
        # only user here, can.
        d = self.munge_dir
        d.mkdir(mode=0o755)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._run_daemon(["munged", "--force", f"--socket={d / 'munge.socket'}",
                          f"--key-file={key}", f"--pid-file={d / 'munged.pid'}",
                          f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munged.seed'}"],
                         "munged")

    def _run_daemon(self, cmd: Sequence[str], name: str, host: Host = LOOPBACK) -> None:
        exe = shutil.which(cmd[0]) or str(Path("/usr/sbin", cmd[0]))
        proc = subprocess.run([*host.enter, exe, *cmd[1:]], env=self.env, capture_output=True,
                              text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed to start (exit {proc.returncode}): "
                               f"{proc.stderr.strip()}\n{self.daemon_logs()}")

    def _pid_files(self) -> list:
        return [*(self.root / f"slurmd-{h.name}.pid" for h in self.hosts),
                self.root / "slurmctld.pid", self.munge_dir / "munged.pid"]

    def stop(self) -> None:
        """Cancel every job, end what the jobs left behind, stop the daemons by pid file."""
        if self.conf.exists():
            jobs = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
            if jobs:
                self.run(["scancel", *jobs], check=False)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and self.run(
                        ["squeue", "-h", "-o", "%i"], check=False).stdout.strip():
                    time.sleep(0.5)
        for pid in self.leftover_job_processes():
            _stop_pid(pid, timeout=5)
        for pid_file in self._pid_files():  # slurmd first: it reports to slurmctld
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                continue
            _stop_pid(pid)

    def leftover_job_processes(self) -> list:
        """Processes started by this cluster's jobs that are still running.

        Paddle's launcher puts every worker in a session of its own, which
        proctrack/pgid does not follow, so a cancelled job can leave workers behind.
        They are found by the SLURM_CONF of this cluster in their environment.
        """
        marker = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if marker in env and b"SLURM_JOB_ID=" in b"\0".join(env) and cmd:
                found.append(int(entry.name))
        return found

    def daemon_logs(self, lines: int = 30) -> str:
        out = []
        for log in (self.root / "slurmctld.log",
                    *(self.root / f"slurmd-{h.name}.log" for h in self.hosts),
                    self.munge_dir / "munged.log"):
            if log.exists():
                tail = log.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {log.name} (last {lines} lines)\n" + "\n".join(tail))
        return "\n".join(out)

    # ------------------------------------------------------------ commands
    def run(self, cmd: Sequence[str], check: bool = True, env: Optional[dict] = None,
            cwd=None, timeout: float = 60) -> subprocess.CompletedProcess:
        """A client command (sbatch, scontrol...) on host 0, the cluster's login node."""
        enter = self.hosts[0].enter
        if enter:  # nsenter starts in the target's working directory: move to ours
            enter = (*enter, "env", "-C", str(cwd or os.getcwd()))
        proc = subprocess.run([*enter, *cmd], env={**self.env, **(env or {})},
                              cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(map(str, cmd))}` exited {proc.returncode}: "
                               f"{proc.stderr.strip()}")
        return proc

    def submit(self, script, args: Iterable[str] = (), env: Optional[dict] = None,
               sbatch_args: Iterable[str] = (), log=None, cwd=None) -> int:
        """sbatch `script args`; returns the job id. `log` sets --output (and --error)."""
        cmd = ["sbatch", "--parsable", *sbatch_args]
        if log is not None:
            cmd.append(f"--output={log}")
        cmd += [str(script), *map(str, args)]
        proc = self.run(cmd, env=env, cwd=cwd)
        job = int(proc.stdout.strip().split(";")[0])
        self._jobs.append(job)
        return job

    def job(self, job_id: int) -> Optional[dict]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...), None if gone."""
        proc = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False)
        if proc.returncode != 0 or not proc.stdout.strip():
            return None
        # -o puts one job per line as space-separated Key=Value pairs; values can hold
        # spaces only in a few keys (Command, WorkDir...) that the tests do not parse.
        return dict(re.findall(r"(\w[\w:/]*)=(\S*)", proc.stdout))

    def wait_state(self, job_id: int, states, timeout: float) -> dict:
        """Poll until the job's JobState is one of `states`; returns the job's info."""
        states = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        info = None
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info and info.get("JobState") in states:
                return info
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout:.0f} s; "
                           f"last: {info and info.get('JobState')} "
                           f"(reason {info and info.get('Reason')})\n{self.daemon_logs(15)}")

    def wait_done(self, job_id: int, timeout: float) -> dict:
        return self.wait_state(job_id, FINISHED, timeout)

    def signal_batch(self, job_id: int, sig: str = "USR1") -> None:
        """Send `sig` to the batch shell only, as --signal=B:SIG@N does before the limit."""
        self.run(["scancel", "--batch", f"--signal={sig}", str(job_id)])

    def cancel(self, job_id: int) -> None:
        self.run(["scancel", str(job_id)])


# ------------------------------------------------------------ helpers for the job tests
def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def wait_for_checkpoint(slurm, job: int, out_dir: Path, timeout: float = 120) -> Path:
    """The first complete checkpoint (its integrity record is written last)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = sorted((out_dir / "checkpoints").glob("ckpt-*.json"))
        if records:
            return records[0]
        info = slurm.job(job)
        assert info and info["JobState"] in ("PENDING", "RUNNING"), \
            f"job {job} ended before its first checkpoint: {info}"
        time.sleep(0.2)
    raise TimeoutError(f"no checkpoint in {out_dir} after {timeout} s")


def assert_completed(info: dict, log: Path) -> None:
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", \
        f"job ended {info['JobState']} {info['ExitCode']}\n{read(log)[-4000:]}"


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """The running cluster; cancelled and stopped at the end even when tests fail."""
    install_seconds = install_slurm()
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.install_seconds = install_seconds
    try:
        cluster.start()
        print(f"\nslurm test cluster: apt install {install_seconds:.1f} s, "
              f"daemons up in {cluster.start_seconds:.1f} s")
        yield cluster
    finally:
        cluster.stop()
