"""Start-up at ImageNet scale: file-system operations, time to first batch and memory
per rank, and epoch reading, for loose files (and packed shards where this checkout
has them), on a file system that adds a fixed latency to every operation.

    python bench/startup.py [--quick] [--entries 1281167] [--data DIR] [--latency-ms 1]
                            [--layout loose|shards|both] [--ranks 1 8] [--cap-s 900]

The data set: `--entries` list lines (default ImageNet's 1,281,167) in ImageNet's layout,
train/nXXXXXXXX/nXXXXXXXX_N.JPEG over 1,000 class folders, hard links to 500 small real
JPEGs (crops of scikit-image's photographs), plus the PaddleClas list train_list.txt and a
prefix of it with --small-entries lines (train_list_small.txt). Built once under --data
and reused. `--quick` is 20,000 entries.

The file system: bench/latency_fs.c, compiled here with gcc against libfuse3 (fuse3 and
libfuse3-dev are installed with apt-get when missing and this runs as root). It passes
every operation through to the data folder after sleeping --latency-ms in each lookup,
getattr, open, read and readdir (not in close), in up to 128 threads, and counts them.
This kernel serialises FUSE lookups within one directory (4 processes looking up names
in one folder: 4.2 ms per lookup at 1 ms; in four folders: 2.0 ms), which NFS does not;
looked-up entries are cached, so it costs only the first lookup of each file.
The kernel may cache entries and attributes for --fs-cache-s (1 s, like NFS's shortest
attribute cache); file contents are never cached across opens (FUSE's default without
kernel_cache), so every open reads again through the latency. The page cache is dropped
before every timed run.

What is measured:
(a) File-system syscalls per rank, process start to first batch: the rank process runs
    under `strace -f -y` (its forked check workers and its threads included) directly on
    the data folder, and only calls whose path or file descriptor (-y prints the path of
    every descriptor) lies under the data folder are counted: opens (open/openat/creat),
    reads (read/pread64/readv/preadv), stats (stat/fstat/lstat/newfstatat/statx/access),
    closes, and the rest (lseek, getdents64, mmap, write, rename, ...). Python's and
    Paddle's own imports touch no path under the data folder, so nothing else needs
    subtracting. One rank of a world of 1, for the small and the big list; the growth
    per extra list entry is (ops_big - ops_small) / (entries_big - entries_small).
    Beside them: the operations the latency file system served per rank in the timed
    runs (what a network file system would be asked; the kernel answers some syscalls
    from its caches).
(b) Time to first batch and peak RSS per rank with 1 and 8 rank processes started at
    once, each with PADDLE_TRAINER_ID / PADDLE_TRAINERS_NUM / PADDLE_LOCAL_RANK as
    paddle.distributed.launch sets them; each builds its DistContext from them with
    ppdpn.dist (no collectives: the data start-up is what is measured), loads the
    recipe (--config, configs/dpn68.yaml: DALI, 8 workers, batch 64) with the data
    folder as DataLoader.image_root, calls ppdpn.data.build_loader(.., "train", ..) as
    train.py does, and takes the first batch of loader.epoch(0). Time to first batch =
    build_loader's call to the first batch in hand (the target is checked on the slowest
    rank); from process start (imports included, 8 ranks share 2 cores here) is beside it.
    Peak RSS = VmHWM of the rank, and the largest of its waited-for children (the check
    workers) apart. Train split tables = the deep size of loader.samples (every list,
    string and array it holds) + loader.sizes. A run over --cap-s is stopped; it reports
    the files opened so far and a linear extrapolation from them.
(c) Epoch reading: Samples.read(i) of the first --read-images samples in the plan's
    order (ShardPlan, as the loader reads), on --read-threads threads, at 0 ms and at
    --latency-ms: img/s, syscalls per image (strace, between two markers) and file-system
    operations per image (latency_fs counts). Each layout twice: in the whole-split
    shuffle (DataLoader.shuffle_block 1), and in the block-local order of
    --shuffle-block 64 / --shuffle-window 8 (rows `<layout>, blocks`), where ShardSamples
    reads a block's span with one pread; loose files read one file per sample in either.
    The shard targets are judged per order, always against loose files in that order.
(d) With ppdpn.data.manifest on this checkout: the first run (which builds the manifest)
    timed apart, and the runs after it "with a valid manifest".

The few places that know about the manifest and shard branches are marked
INTEGRATION below. The last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

IMAGENET_TRAIN = 1_281_167
CLASSES = 1000
SOURCE_JPEGS = 500  # distinct files behind the hard links
MARK = ".startup_bench_mark_"  # stat()ed by children to split a strace into phases
STATS_FILE = ".latency_fs_stats"
FS_THREADS = 128  # > 8 ranks x 8 check workers: callers never queue for a daemon thread
OP_KINDS = {"opens": ("open", "openat", "openat2", "creat"),
            "reads": ("read", "pread64", "readv", "preadv", "preadv2"),
            "stats": ("stat", "fstat", "lstat", "newfstatat", "statx", "access",
                      "faccessat", "faccessat2"),
            "closes": ("close",)}
OTHER_CALLS = ("lseek", "getdents64", "mmap", "readlink", "write", "pwrite64", "rename",
               "renameat", "renameat2", "unlink", "unlinkat", "mkdir", "mkdirat", "fsync",
               "fdatasync", "ftruncate", "fallocate")
KIND_OF = {call: kind for kind, calls in OP_KINDS.items() for call in calls}


# ------------------------------------------------------------------ INTEGRATION points

def manifest_available() -> bool:
    """INTEGRATION: the manifest branch adds ppdpn.data.manifest."""
    return importlib.util.find_spec("ppdpn.data.manifest") is not None


def remove_manifests(data_dir: Path) -> list:
    """INTEGRATION: delete what the manifest code wrote for this data set, so the next
    run builds it again: <list>.manifest.npz (+ .lock) beside each list file."""
    gone = []
    for p in data_dir.glob("*manifest*"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
        gone.append(p.name)
    return gone


def pack_available() -> bool:
    """INTEGRATION: the shard branch adds `python -m data.pack`."""
    return importlib.util.find_spec("data.pack") is not None


def pack_shards(data_dir: Path, list_name: str) -> str:
    """INTEGRATION: pack the list's files into tar shards; returns DataLoader.train_list
    (relative to the data folder) naming the shard index. Done once, reused: data.pack
    finds a complete pack with today's defaults and says so, resumes an interrupted
    one, and replaces one of other settings (--overwrite)."""
    name = Path(list_name).stem
    index = Path(f"shards_{name}") / f"{name}.index.npz"
    cmd = [sys.executable, "-m", "data.pack", "--root", str(data_dir), "--list", list_name,
           "--out", str(data_dir / index.parent), "--name", name, "--overwrite"]
    print("#", " ".join(cmd), flush=True)
    t = time.time()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    print(f"# packed (or found packed) in {time.time() - t:.0f} s", flush=True)
    return str(index)


def split_samples(image_root: str, train_list: str):
    """INTEGRATION: the train split's Samples as the loader gets them, without the
    pre-flight (load_split of DataLoader.train_list; shards: the index file)."""
    from ppdpn.data.lists import load_split
    return load_split(image_root, train_list)


def read_order(num_samples: int, batch_size: int, seed: int, block: int = 1, window: int = 1):
    """INTEGRATION: the order rank 0 of 1 reads epoch 0 in (LoaderBase's plan), with
    DataLoader.shuffle_block = block and shuffle_window = window."""
    from ppdpn.data.plan import ShardPlan
    plan = ShardPlan(num_samples, 1, 0, batch_size, shuffle=True, seed=seed, block=block,
                     window=window)
    return plan.batches(0)[0].reshape(-1)


# ------------------------------------------------------------------ the data set

def source_jpegs(count: int, seed: int = 0) -> list:
    """`count` small real JPEGs: crops of scikit-image's photographs, 96-320 px a side."""
    import cv2
    import numpy as np
    import skimage.data as sd
    photos = [sd.astronaut(), sd.coffee(), sd.chelsea(), sd.rocket(), sd.hubble_deep_field(),
              sd.immunohistochemistry(), sd.retina()]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        img = photos[rng.integers(len(photos))]
        h, w = (int(v) for v in rng.integers(96, 321, size=2))
        h, w = min(h, img.shape[0]), min(w, img.shape[1])
        y, x = rng.integers(img.shape[0] - h + 1), rng.integers(img.shape[1] - w + 1)
        crop = cv2.cvtColor(np.ascontiguousarray(img[y:y + h, x:x + w, :3]), cv2.COLOR_RGB2BGR)
        ok, buf = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 85])
        out.append(buf.tobytes())
    return out


def build_dataset(base: Path, entries: int, small: int) -> Path:
    """The data folder for `entries` list lines (reused when complete)."""
    root = base / f"n{entries}"
    done = root / "dataset.json"
    if done.is_file() and json.loads(done.read_text()).get("small") == small:
        return root
    t0 = time.time()
    print(f"# building {entries:,} hard links under {root} (once)", flush=True)
    (root / "src").mkdir(parents=True, exist_ok=True)
    sources = []
    for k, data in enumerate(source_jpegs(SOURCE_JPEGS)):
        path = root / "src" / f"{k:04d}.JPEG"
        path.write_bytes(data)
        sources.append(str(path))
    lines = []
    per_class, extra = divmod(entries, CLASSES)
    n = 0
    for c in range(CLASSES):
        syn = f"n{1440764 + 7 * c:08d}"
        os.makedirs(root / "train" / syn, exist_ok=True)
        for i in range(per_class + (c < extra)):
            rel = f"train/{syn}/{syn}_{i + 1}.JPEG"
            dst = root / rel
            if not dst.exists():
                os.link(sources[n % len(sources)], dst)
            lines.append(f"{rel} {c}\n")
            n += 1
    (root / "train_list.txt").write_text("".join(lines))
    (root / "train_list_small.txt").write_text("".join(lines[:small]))
    mean = statistics.mean(os.path.getsize(s) for s in sources)
    done.write_text(json.dumps({"entries": entries, "small": small, "mean_bytes": mean}))
    print(f"# built in {time.time() - t0:.0f} s", flush=True)
    return root


# ------------------------------------------------------------------ the file system

def ensure_fuse() -> None:
    """fuse3 + libfuse3-dev + gcc, installed with apt-get when missing (as root)."""
    have = shutil.which("fusermount3") and shutil.which("gcc") and subprocess.run(
        ["pkg-config", "--exists", "fuse3"], capture_output=True).returncode == 0 \
        if shutil.which("pkg-config") else False
    if have:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        sys.exit("bench/startup.py needs FUSE 3: apt-get install -y fuse3 libfuse3-dev "
                 "pkg-config gcc (as root)")
    cmd = ["apt-get", "install", "-y", "-q", "fuse3", "libfuse3-dev", "pkg-config", "gcc"]
    print("# installing FUSE 3:", " ".join(cmd), flush=True)
    if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], stdout=subprocess.DEVNULL, check=True)
        subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)


def compile_fs(build_dir: Path) -> Path:
    ensure_fuse()
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True,
                           text=True, check=True).stdout.split()
    exe = build_dir / "latency_fs"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(REPO / "bench/latency_fs.c"),
                    *flags, "-lpthread"], check=True)
    return exe


_MOUNTS = []  # (mountpoint, process): unmounted at exit, on errors and on Ctrl-C


def unmount_all() -> None:
    while _MOUNTS:
        mnt, proc = _MOUNTS.pop()
        proc.terminate()  # the daemon unmounts itself on SIGTERM
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)  # if it could not


class LatencyFS:
    """The data folder mounted through latency_fs for the `with` block."""

    def __init__(self, exe: Path, backing: Path, latency_ms: float, cache_s: float):
        self.exe, self.backing, self.latency_ms, self.cache_s = exe, backing, latency_ms, cache_s

    def __enter__(self):
        # Always the same path beside the data folder: the manifest is keyed by the image
        # root's absolute path, so a manifest built through one mount stays valid in the next
        self.mnt = str(self.backing.parent / f"{self.backing.name}.mnt")
        os.makedirs(self.mnt, exist_ok=True)
        if os.path.ismount(self.mnt):  # left by a run that was killed with SIGKILL
            subprocess.run(["fusermount3", "-u", "-z", self.mnt], capture_output=True)
        c = self.cache_s
        opts = f"entry_timeout={c},attr_timeout={c},negative_timeout={c},auto_unmount"
        self.proc = subprocess.Popen([str(self.exe), str(self.backing),
                                      str(int(round(self.latency_ms * 1000))),
                                      str(FS_THREADS), self.mnt, "-f", "-o", opts])
        _MOUNTS.append((self.mnt, self.proc))
        for _ in range(200):
            if os.path.ismount(self.mnt):
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"latency_fs exited with {self.proc.returncode}")
            time.sleep(0.05)
        raise RuntimeError("latency_fs did not mount within 10 s")

    def __exit__(self, *exc):
        unmount_all()

    def stats(self) -> dict:
        """Operations served so far, and the daemon's CPU seconds."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime + stime
        return {**fs_stats(self.mnt), "daemon_cpu_s": ticks / os.sysconf("SC_CLK_TCK")}


def fs_stats(mnt: str) -> dict:
    text = Path(mnt, STATS_FILE).read_text()
    return {k: int(v) for k, v in (line.split() for line in text.splitlines())}


def fs_diff(after: dict, before: dict) -> dict:
    d = {k: after[k] - before.get(k, 0) for k in after}
    # release (close) never waits; the daemon's CPU time is not an operation
    d["total"] = sum(v for k, v in d.items() if k not in ("release", "daemon_cpu_s"))
    return d


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return True
    except OSError:
        return False


def lookup_ms(fs: LatencyFS, sample_paths) -> float:
    """Median time of a stat of a path not yet looked up (one lookup through the FS)."""
    times = []
    for rel in sample_paths:
        t = time.perf_counter()
        os.stat(os.path.join(fs.mnt, rel))
        times.append((time.perf_counter() - t) * 1e3)
    return round(statistics.median(times), 3)


# ------------------------------------------------------------------ children: one rank, one reader

def mark(root: str, name: str) -> None:
    os.path.exists(os.path.join(root, MARK + name))


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def deep_bytes(obj, seen=None) -> int:
    """Bytes held by obj and everything it references (lists, strings, arrays, attributes)."""
    import numpy as np
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return obj.nbytes if obj.base is None or isinstance(obj.base, (bytes, np.ndarray)) \
            else sys.getsizeof(obj)  # memory-mapped: the file, not the heap
    size = sys.getsizeof(obj)
    if isinstance(obj, (str, bytes, int, float, bool, type(None))):
        return size
    if isinstance(obj, (list, tuple, set, frozenset)):
        return size + sum(deep_bytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return size + sum(deep_bytes(k, seen) + deep_bytes(v, seen) for k, v in obj.items())
    fields = dict(getattr(obj, "__dict__", {}))
    for slot in getattr(type(obj), "__slots__", ()):
        if hasattr(obj, slot):
            fields[slot] = getattr(obj, slot)
    return size + sum(deep_bytes(v, seen) for v in fields.values())


def rank_child(spec: dict) -> None:
    """One rank: the recipe, DistContext from the launcher's variables, build_loader, the
    first batch of epoch 0. Writes its figures to spec["out"]."""
    spawned = float(os.environ["STARTUP_BENCH_SPAWNED"])
    from ppdpn import dist
    from ppdpn.config import load_config
    from ppdpn.data import build_loader
    cfg = load_config(spec["config"], spec["overrides"])
    rank, world, local = dist.env_rank_world()
    ctx = dist.DistContext(rank, world, local, dist.select_device(cfg.Global.device, local))
    root = cfg.DataLoader.image_root
    rss_before = vm_hwm_mb()
    t0 = time.time()
    if spec["mark"]:
        mark(root, "startup")
    loader = build_loader(cfg.DataLoader, "train", ctx, cfg.Global.seed, cfg.Arch.class_num)
    t1 = time.time()
    images, _, _ = next(iter(loader.epoch(0)))
    t2 = time.time()
    if spec["mark"]:
        mark(root, "end")
    import resource
    cpu = sum(getattr(resource.getrusage(who), f) for who in
              (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) for f in ("ru_utime", "ru_stime"))
    out = {"rank": rank, "cpu_s": round(cpu, 1), "world": world, "imports_s": round(t0 - spawned, 2),
           "build_loader_s": round(t1 - t0, 2), "first_batch_s": round(t2 - t0, 2),
           "from_process_start_s": round(t2 - spawned, 2),
           "peak_rss_mb": round(vm_hwm_mb(), 1), "rss_before_loader_mb": round(rss_before, 1),
           "workers_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
           "tables_mb": round((deep_bytes(loader.samples) + deep_bytes(loader.sizes)) / 2**20, 1),
           "samples": loader.num_samples, "batch_shape": list(images.shape)}
    Path(spec["out"]).write_text(json.dumps(out))
    sys.stdout.flush()
    os._exit(0)  # DALI's and Paddle's teardown is not what is measured


def read_child(spec: dict) -> None:
    """Samples.read over the plan's order on `threads` threads, timed."""
    from concurrent.futures import ThreadPoolExecutor
    samples = split_samples(spec["root"], spec["train_list"])
    tables_mb = round(deep_bytes(samples) / 2**20, 1)
    block, window = spec["block"], spec["window"]
    samples.read_in_blocks(block, window)  # as LoaderBase sets it up
    order = read_order(len(samples), spec["batch_size"], spec["seed"], block,
                       window)[:spec["images"]].tolist()
    before = fs_stats(spec["root"]) if spec["fs"] else {}
    if spec["mark"]:
        mark(spec["root"], "read")
    t = time.perf_counter()
    with ThreadPoolExecutor(spec["threads"]) as pool:
        nbytes = sum(a.size for a in pool.map(samples.read, order))
    seconds = time.perf_counter() - t
    if spec["mark"]:
        mark(spec["root"], "end")
    ops = fs_diff(fs_stats(spec["root"]), before) if spec["fs"] else {}
    Path(spec["out"]).write_text(json.dumps({
        "samples": len(samples), "samples_tables_mb": tables_mb,
        "images": len(order), "seconds": round(seconds, 3), "img_s": round(len(order) / seconds, 1),
        "mean_bytes": round(nbytes / len(order)), "fs_ops": ops,
        "fs_ops_per_image": round(ops["total"] / len(order), 3) if ops else None}))
    os._exit(0)


# ------------------------------------------------------------------ the parent: runs and counts

_CHILDREN = []  # process groups started here, killed on errors and Ctrl-C


def kill_children() -> None:
    while _CHILDREN:
        proc = _CHILDREN.pop()
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def strace_prefix(trace: Path) -> list:
    calls = [c for cs in OP_KINDS.values() for c in cs] + list(OTHER_CALLS)
    # --seccomp-bpf: only the traced calls stop the process (Paddle makes many others)
    return ["strace", "-f", "--seccomp-bpf", "-y", "-s", "0", "-qq", "-o", str(trace),
            "-e", "trace=" + ",".join("?" + c for c in calls)]


def count_trace(trace: Path, data_dir: Path) -> dict:
    """{phase: {kind: count}} of the traced calls on paths under data_dir; a phase starts
    at each marker a child stat()s ("before" until the first)."""
    pre = str(data_dir.resolve()).encode()
    under = (pre + b"/", pre + b">", pre + b'"')
    marker = MARK.encode()
    phase, counts = "before", {}
    with open(trace, "rb") as f:
        for line in f:
            parts = line.split(None, 1)
            if len(parts) < 2 or parts[1].startswith(b"<...") or b"(" not in parts[1]:
                continue
            rest = parts[1]
            if marker in rest:
                phase = rest.split(marker, 1)[1].split(b'"', 1)[0].decode()
                continue
            if not any(u in rest for u in under):
                continue
            name = rest[:rest.index(b"(")].decode()
            kinds = counts.setdefault(phase, dict.fromkeys((*OP_KINDS, "other", "total"), 0))
            kinds[KIND_OF.get(name, "other")] += 1
            kinds["total"] += 1
    trace.unlink()
    return counts


def start_child(kind: str, spec: dict, env: dict, log: Path, trace=None) -> subprocess.Popen:
    cmd = [sys.executable, str(Path(__file__).resolve()), kind, json.dumps(spec)]
    if trace:
        cmd = strace_prefix(trace) + cmd
    env = dict(os.environ, **env, STARTUP_BENCH_SPAWNED=repr(time.time()))
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    _CHILDREN.append(proc)
    return proc


def peak_rss_so_far(pid: int):
    """(VmHWM of the rank under process `pid` (itself, or below strace), the largest of
    its workers') in MB, read before a stopped run is killed."""
    import psutil

    def hwm(p) -> float:
        for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0
    try:
        top = psutil.Process(pid)
        rank = next(p for p in [top, *top.children(recursive=True)] if "_rank" in p.cmdline())
        workers = [hwm(w) for w in rank.children(recursive=True)]
        return round(hwm(rank), 1), round(max(workers, default=0.0), 1)
    except (StopIteration, psutil.Error, OSError):
        return None, None


def wait_children(procs, cap_s: float, logs):
    """Wait for all: None when they finished; when the cap was hit, every one is killed
    and the result is [(rank's peak RSS so far, its workers' largest)] per process."""
    deadline = time.time() + cap_s
    for proc, log in zip(procs, logs):
        try:
            rc = proc.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            peaks = [peak_rss_so_far(p.pid) for p in procs]
            kill_children()
            return peaks
        if rc != 0:
            kill_children()
            tail = log.read_text().splitlines()[-15:]
            raise RuntimeError(f"{log.name} exited with {rc}:\n" + "\n".join(tail))
    return None


def run_ranks(world: int, image_root: str, train_list: str, args, entries: int,
              fs: LatencyFS = None, trace: Path = None) -> dict:
    """`world` rank processes started at once, up to the first batch each."""
    tmp = Path(tempfile.mkdtemp(prefix="startup_ranks_"))
    overrides = [f"DataLoader.image_root={image_root}", f"DataLoader.train_list={train_list}"]
    overrides += [f"DataLoader.backend={args.backend}"] if args.backend else []
    before = fs.stats() if fs else {}
    cache_dropped = drop_caches()
    t0 = time.time()
    procs, logs = [], []
    for r in range(world):
        spec = {"config": str(REPO / args.config), "overrides": overrides,
                "mark": trace is not None, "out": str(tmp / f"rank{r}.json")}
        env = {"PADDLE_TRAINER_ID": str(r), "PADDLE_TRAINERS_NUM": str(world),
               "PADDLE_LOCAL_RANK": str(r), "OMP_NUM_THREADS": "1"}
        logs.append(tmp / f"rank{r}.log")
        procs.append(start_child("_rank", spec, env, logs[-1], trace))
    peaks = wait_children(procs, args.cap_s, logs)
    capped = peaks is not None
    elapsed = min(time.time() - t0, args.cap_s)
    out = {"world": world, "entries": entries, "page_cache_dropped": cache_dropped,
           "wall_s": round(elapsed, 1)}
    if fs:
        ops = fs_diff(fs.stats(), before)
        out["fs_daemon_cpu_s"] = round(ops.pop("daemon_cpu_s"), 1)
        out["fs_ops_per_rank"] = {k: round(v / world) for k, v in ops.items()}
    if trace:
        out["syscalls"] = count_trace(trace, Path(image_root))
        s = out["syscalls"]
        out["syscalls_to_first_batch"] = {k: s.get("before", {}).get(k, 0) + s.get("startup", {}).get(k, 0)
                                          for k in (*OP_KINDS, "other", "total")}
    if capped:
        # Progress: every start-up path so far opens each listed file once per rank
        opened = out["syscalls_to_first_batch"]["opens"] if trace else ops["open"]
        done = min(1.0, opened / (entries * world))
        out.update(capped=True, files_opened_fraction=round(done, 4),
                   extrapolated_s=round(elapsed / done) if done else None,
                   peak_rss_so_far_mb=max((p[0] or 0 for p in peaks), default=None),
                   workers_peak_rss_so_far_mb=max((p[1] or 0 for p in peaks), default=None))
        if trace and done:
            out["syscalls_extrapolated"] = {k: round(v / done) for k, v in
                                            out["syscalls_to_first_batch"].items()}
        print(f"#   stopped after {elapsed:.0f} s (--cap-s); {done:.1%} of the files opened",
              flush=True)
    else:
        out["ranks"] = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]
        for key in ("first_batch_s", "from_process_start_s", "peak_rss_mb",
                    "workers_peak_rss_mb", "tables_mb", "cpu_s"):
            out[key] = max(r[key] for r in out["ranks"])
        out["cpu_s_all_ranks"] = round(sum(r["cpu_s"] for r in out["ranks"]), 1)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def run_reader(image_root: str, train_list: str, args, fs: LatencyFS = None,
               trace: Path = None, block: int = 1) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="startup_read_"))
    spec = {"root": image_root, "train_list": train_list, "images": args.read_images,
            "block": block, "window": args.shuffle_window,
            "threads": args.read_threads, "batch_size": 64, "seed": 0, "fs": fs is not None,
            "mark": trace is not None, "out": str(tmp / "read.json")}
    cache_dropped = drop_caches()
    log = tmp / "read.log"
    proc = start_child("_read", spec, {}, log, trace)
    wait_children([proc], args.cap_s, [log])
    out = json.loads((tmp / "read.json").read_text())
    out["page_cache_dropped"] = cache_dropped
    if trace:
        per = count_trace(trace, Path(image_root)).get("read", {})
        out["syscalls"] = per
        out["syscalls_per_image"] = {k: round(v / out["images"], 3) for k, v in per.items()}
    shutil.rmtree(tmp, ignore_errors=True)
    return out


# ------------------------------------------------------------------ the measurements

def measure_startup(layout: str, lists: dict, data: Path, exe: Path, args, sizes: dict) -> dict:
    """(a) syscalls per rank for the small and the big list, (b) timed runs on the FS."""
    manifest = manifest_available()
    res = {"syscalls": {}, "runs": {}}
    for size in ("small", "big"):
        print(f"# {layout}: syscalls per rank, {sizes[size]:,} entries (strace, 1 rank)",
              flush=True)
        trace = Path(tempfile.mkdtemp(prefix="startup_trace_")) / "trace"
        if manifest:
            remove_manifests(data)
            res["syscalls"][f"{size}_building_manifest"] = run_ranks(
                1, str(data), lists[size], args, sizes[size], trace=trace)
        res["syscalls"][size] = run_ranks(1, str(data), lists[size], args, sizes[size], trace=trace)
    with LatencyFS(exe, data, args.latency_ms, args.fs_cache_s) as fs:
        res["lookup_ms"] = lookup_ms(fs, [f"src/{k:04d}.JPEG" for k in range(20)])
        if manifest:
            remove_manifests(data)
            print(f"# {layout}: building the manifest, 1 rank, {args.latency_ms} ms FS", flush=True)
            res["manifest_build"] = run_ranks(1, fs.mnt, lists["big"], args, sizes["big"], fs=fs)
        for world in args.ranks:
            print(f"# {layout}: {world} rank(s) to the first batch, {sizes['big']:,} entries, "
                  f"{args.latency_ms} ms FS", flush=True)
            res["runs"][world] = run_ranks(world, fs.mnt, lists["big"], args, sizes["big"], fs=fs)
    return res


def reading_rows(layouts: dict, args) -> dict:
    """{row: (list file, shuffle_block)}: each layout in the whole-split shuffle and, with
    --shuffle-block > 1, in the block-local order (`<layout>, blocks`)."""
    rows = {lay: (lists["big"], 1) for lay, lists in layouts.items()}
    if args.shuffle_block > 1:
        rows.update({f"{lay}, blocks": (lists["big"], args.shuffle_block)
                     for lay, lists in layouts.items()})
    return rows


def measure_reading(layouts: dict, data: Path, exe: Path, args) -> dict:
    """(c) Samples.read over the plan's order, rows interleaved in each round."""
    rows = reading_rows(layouts, args)
    res = {row: {"syscalls": None, "by_latency": {}} for row in rows}
    for row, (lst, block) in rows.items():
        trace = Path(tempfile.mkdtemp(prefix="startup_trace_")) / "trace"
        res[row]["syscalls"] = run_reader(str(data), lst, args, trace=trace, block=block)
    for lat in (0.0, args.latency_ms):
        with LatencyFS(exe, data, lat, args.fs_cache_s) as fs:
            runs = {row: [] for row in rows}
            for r in range(args.read_rounds):
                for row, (lst, block) in rows.items():
                    print(f"# reading: {row}, {lat} ms FS, round {r + 1}", flush=True)
                    runs[row].append(run_reader(fs.mnt, lst, args, fs=fs, block=block))
            for lay in rows:
                res[lay]["by_latency"][str(lat)] = {
                    "img_s": statistics.median(x["img_s"] for x in runs[lay]),
                    "img_s_rounds": [x["img_s"] for x in runs[lay]],
                    "fs_ops_per_image": runs[lay][0]["fs_ops_per_image"],
                    "fs_ops": runs[lay][0]["fs_ops"], "mean_bytes": runs[lay][0]["mean_bytes"]}
    return res


def judge(startup: dict, reading: dict, sizes: dict, args) -> list:
    """The issue's targets beside what was measured: pass True/False, None = not measured."""
    out = []

    def target(name, passed, measured):
        out.append({"target": name, "pass": passed, "measured": measured})

    loose_path = "with a valid manifest" if manifest_available() else \
        "no manifest on this checkout: the start-up path is the per-rank pre-flight"
    for lay, res in startup.items():
        path = loose_path if lay == "loose" else "from the shard index"
        small, big = (syscalls_total(res["syscalls"][k]) for k in ("small", "big"))
        slope = (big[0] - small[0]) / (sizes["big"] - sizes["small"])
        target(f"{lay}: start-up FS ops per rank do not grow with the files "
               f"(< 0.01 more per extra list entry; {path})", slope < 0.01,
               f"{small[0]:,}{small[1]} syscalls at {sizes['small']:,} entries, "
               f"{big[0]:,}{big[1]} at {sizes['big']:,}: {slope:.3f} per extra entry")
        run8 = res["runs"].get(8)
        if run8:
            t = run8.get("first_batch_s")
            target(f"{lay}: time to first batch, 8 ranks, {sizes['big']:,} entries, "
                   f"{args.latency_ms} ms FS <= 30 s (slowest rank; 1.28 M is the target)",
                   t is not None and t <= 30,
                   f"{t} s" if t is not None else f"> {args.cap_s:.0f} s (stopped), "
                   f"extrapolated {run8.get('extrapolated_s')} s")
        runs = [*res["runs"].values(), res["syscalls"]["big"]]
        tables = [r["tables_mb"] for r in runs if "tables_mb" in r]
        what = "loader.samples + loader.sizes"
        if not tables and lay in reading:  # no start-up run at this size reached its first batch
            tables, what = [reading[lay]["syscalls"]["samples_tables_mb"]], \
                "the Samples load_split gives, without loader.sizes: no start-up run finished"
        target(f"{lay}: per-rank memory of the train split tables < 200 MB "
               f"({sizes['big']:,} entries)", max(tables) < 200 if tables else None,
               f"{max(tables)} MB ({what})" if tables else "no start-up run finished")
    lat = str(args.latency_ms)
    for suffix, how in (("", "whole-split shuffle"),
                        (", blocks", f"shuffle_block {args.shuffle_block}, window {args.shuffle_window}")):
        if "shards" + suffix not in reading:
            continue
        sh, lo = reading["shards" + suffix]["by_latency"], reading["loose" + suffix]["by_latency"]
        target(f"shards ({how}): FS ops per image well under 1 (< 0.5)",
               sh[lat]["fs_ops_per_image"] < 0.5,
               f"{sh[lat]['fs_ops_per_image']} (loose files {lo[lat]['fs_ops_per_image']})")
        ratio = sh[lat]["img_s"] / lo[lat]["img_s"]
        target(f"shards ({how}) >= 5x img/s of loose files at {lat} ms, same threads and order",
               ratio >= 5, f"{ratio:.2f}x ({sh[lat]['img_s']} vs {lo[lat]['img_s']} img/s)")
        ratio0 = sh["0.0"]["img_s"] / lo["0.0"]["img_s"]
        target(f"shards ({how}) not below loose files at 0 ms", ratio0 >= 1,
               f"{ratio0:.2f}x ({sh['0.0']['img_s']} vs {lo['0.0']['img_s']} img/s)")
    if reading and "shards" not in reading:
        for name in ("shards: FS ops per image well under 1 (< 0.5)",
                     f"shards >= 5x img/s of loose files at {lat} ms, same threads",
                     "shards not below loose files at 0 ms"):
            target(name, None, "shards: not available on this checkout")
    return out


def syscalls_total(run: dict):
    """(syscalls to the first batch, note): extrapolated when the run was stopped."""
    if run.get("capped"):
        total = run.get("syscalls_extrapolated", {}).get("total", 0)
        return total, f" (extrapolated from {run['files_opened_fraction']:.1%} of the files)"
    return run["syscalls_to_first_batch"]["total"], ""


def report(startup: dict, reading: dict, targets: list, args) -> None:
    ops = lambda d: ", ".join(f"{k} {d.get(k, 0):,}" for k in (*OP_KINDS, "other", "total"))  # noqa: E731
    for lay, res in startup.items():
        print(f"\nstart-up, {lay} (FS lookup measured {res['lookup_ms']} ms):")
        for key, r in res["syscalls"].items():
            head = (f"  syscalls on data files to the first batch, 1 rank, {r['entries']:,} "
                    f"entries{' (building the manifest)' if 'building' in key else ''}:")
            if r.get("capped"):
                print(f"{head} stopped after {r['wall_s']} s under strace with "
                      f"{r['files_opened_fraction']:.1%} of the files opened: "
                      f"{ops(r['syscalls_to_first_batch'])} so far; extrapolated to all: "
                      f"{ops(r.get('syscalls_extrapolated', {}))}")
            else:
                print(f"{head} {ops(r['syscalls_to_first_batch'])}; {r['wall_s']} s under strace")
        if "manifest_build" in res:
            r = res["manifest_build"]
            print(f"  manifest built once, 1 rank, {args.latency_ms} ms FS: "
                  f"{r.get('first_batch_s', '> cap')} s to the first batch")
        for world, r in res["runs"].items():
            head = f"  {world} rank(s), {r['entries']:,} entries, {args.latency_ms} ms FS:"
            fs_ops = ", ".join(f"{k} {v:,}" for k, v in r["fs_ops_per_rank"].items())
            if r.get("capped"):
                print(f"{head} > {args.cap_s:.0f} s (stopped; {r['files_opened_fraction']:.1%} "
                      f"of the files opened, extrapolated {r['extrapolated_s']} s); peak RSS "
                      f"so far {r['peak_rss_so_far_mb']} MB (check workers "
                      f"{r['workers_peak_rss_so_far_mb']} MB); FS daemon CPU "
                      f"{r['fs_daemon_cpu_s']} s; FS ops per rank so far: {fs_ops}")
                continue
            print(f"{head} first batch {r['first_batch_s']} s after build_loader "
                  f"({r['from_process_start_s']} s from process start), peak RSS "
                  f"{r['peak_rss_mb']} MB (check workers {r['workers_peak_rss_mb']} MB), "
                  f"train split tables {r['tables_mb']} MB; CPU {r['cpu_s_all_ranks']} s in "
                  f"all ranks + {r['fs_daemon_cpu_s']} s in the FS daemon "
                  f"({os.cpu_count()} cores); FS ops per rank: {fs_ops}")
    if not reading:
        print("\nepoch reading: not measured (--no-reading)")
    else:
        print(f"\nepoch reading, Samples.read, {args.read_threads} threads, "
              f"{args.read_images:,} images in the plan's order (`, blocks`: shuffle_block "
              f"{args.shuffle_block}, shuffle_window {args.shuffle_window}):")
    for lay, res in reading.items():
        s = res["syscalls"]
        print(f"  {lay}: syscalls per image {s['syscalls_per_image'].get('total')} "
              f"({', '.join(f'{k} {v}' for k, v in s['syscalls_per_image'].items() if k != 'total')}); "
              f"{s['mean_bytes']:,} bytes per image")
        for lat, r in res["by_latency"].items():
            print(f"    {lat} ms FS: {r['img_s']:,} img/s (rounds {r['img_s_rounds']}), "
                  f"FS ops per image {r['fs_ops_per_image']}")
    if reading and "shards" not in reading:
        print("  shards: not available on this checkout")
    print("\ntargets:")
    for t in targets:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[t["pass"]]
        print(f"  [{verdict}] {t['target']}: {t['measured']}")


def checkout() -> str:
    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO,
                             capture_output=True, text=True).stdout.strip()
        branch = subprocess.run(["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip()
        return f"{branch} {rev}"
    except OSError:
        return "unknown"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 20,000 entries, 2,000 in the small list, 5,000 images read")
    p.add_argument("--entries", type=int, default=IMAGENET_TRAIN)
    p.add_argument("--small-entries", type=int, default=20000,
                   help="the small list, to see how start-up ops grow with the files")
    p.add_argument("--data", default="/work/.bench_data/startup",
                   help="where the data sets are built once and reused")
    p.add_argument("--layout", choices=["loose", "shards", "both"], default="both")
    p.add_argument("--latency-ms", type=float, default=1.0)
    p.add_argument("--fs-cache-s", type=float, default=1.0,
                   help="kernel entry/attribute cache time of the latency FS")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 8])
    p.add_argument("--config", default="configs/dpn68.yaml", help="the recipe each rank loads")
    p.add_argument("--backend", choices=["dali", "fallback"], default=None,
                   help="DataLoader.backend (default: the recipe's)")
    p.add_argument("--cap-s", type=float, default=900.0, help="stop a run after this long")
    p.add_argument("--read-images", type=int, default=20000)
    p.add_argument("--read-threads", type=int, default=4)
    p.add_argument("--read-rounds", type=int, default=3)
    p.add_argument("--shuffle-block", type=int, default=64,
                   help="(c) also reads in DataLoader.shuffle_block's block-local order with "
                        "this block (1: only the whole-split shuffle)")
    p.add_argument("--shuffle-window", type=int, default=8, help="DataLoader.shuffle_window for it")
    p.add_argument("--no-reading", action="store_true",
                   help="start-up only: skip (c), and packing when --layout loose")
    args = p.parse_args(argv)
    if args.quick:
        args.entries, args.small_entries = 20000, 2000
        args.read_images = min(args.read_images, 5000)
    if not 0 < args.small_entries < args.entries:
        p.error("need 0 < --small-entries < --entries")
    args.read_images = min(args.read_images, args.entries)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    atexit.register(unmount_all)
    atexit.register(kill_children)
    # Run the finally blocks (unmount, kill the ranks) on Ctrl-C, kill and hang-up, also
    # when started with SIGINT ignored (a background job of a non-interactive shell)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _: sys.exit(128 + signum))
    t0, load0 = time.time(), os.getloadavg()[0]
    print(f"# checkout {checkout()}; {os.cpu_count()} cores; {args.entries:,} entries; "
          f"FS latency {args.latency_ms} ms", flush=True)
    data = build_dataset(Path(args.data), args.entries, args.small_entries)
    sizes = {"small": args.small_entries, "big": args.entries}
    # Every temporary file of the run (mount points, traces, rank outputs) goes here
    work = tempfile.mkdtemp(prefix="startup_bench_")
    tempfile.tempdir = work
    build_dir = Path(work)
    try:
        exe = compile_fs(build_dir)
        layouts = {"loose": {"small": "train_list_small.txt", "big": "train_list.txt"}}
        if args.no_reading and args.layout == "loose":
            pass  # nothing reads shards: do not pack them
        elif pack_available():
            layouts["shards"] = {s: pack_shards(data, layouts["loose"][s]) for s in sizes}
        else:
            print("shards: not available on this checkout", flush=True)
        # --layout picks the start-up runs; reading always compares every layout there is
        startup = {lay: measure_startup(lay, lists, data, exe, args, sizes)
                   for lay, lists in layouts.items() if args.layout in (lay, "both")}
        reading = {} if args.no_reading else measure_reading(layouts, data, exe, args)
    finally:
        kill_children()
        unmount_all()
        tempfile.tempdir = None
        shutil.rmtree(work, ignore_errors=True)
    targets = judge(startup, reading, sizes, args)
    report(startup, reading, targets, args)
    meta = json.loads((data / "dataset.json").read_text())
    print(json.dumps({"bench": "startup", "checkout": checkout(), "cores": os.cpu_count(),
                      "loadavg_1min_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)],
                      "seconds": round(time.time() - t0), "entries": args.entries,
                      "small_entries": args.small_entries, "mean_jpeg_bytes": round(meta["mean_bytes"]),
                      "latency_ms": args.latency_ms, "fs_cache_s": args.fs_cache_s,
                      "config": args.config, "manifest": manifest_available(),
                      "layouts": list(layouts), "read_threads": args.read_threads,
                      "read_images": args.read_images, "shuffle_block": args.shuffle_block,
                      "shuffle_window": args.shuffle_window, "startup": startup, "reading": reading,
                      "targets": targets}))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("_rank", "_read"):
        (rank_child if sys.argv[1] == "_rank" else read_child)(json.loads(sys.argv[2]))
    sys.exit(main())
