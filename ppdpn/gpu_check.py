"""Acceptance check of this node's GPU paths: `python -m ppdpn.gpu_check` (about 5-10 min).

Run it from the repository (it starts launch.sh and train.py) on a GPU node after
installing, before a long job. It prints a table and, last, one JSON line:

  env        Paddle's run_check, CUDA/cuDNN, the cuDNN flags set and read back, the node's
             address as launch.sh passes it against the launcher's own lookup
  dali       DALI `mixed` batches handed to Paddle through DLPack on gpu:<local rank> equal
             DALI's own host copies bit for bit, read while the GPU is busy
  train      a short AMP O2 run through launch.sh on a generated data set (all GPUs, at
             most 2): finite loss, a loss scale that moves, SIGUSR1 -> checkpoint -> exact
             resume (weights equal to an uninterrupted run), ranks agree, eval-only on the
             recipe, resume with AMP off
  bench      `train.py --benchmark`: fp32 NCHW, O2 NHWC, bf16 O1, O2 + recompute, and the
             real loader's data wait
  export     export on the device, predict with Paddle Inference there, and with
             TensorRT fp32/fp16 (engines counted), top-1 equal to dygraph

Without a GPU it runs what it can (in fp32 on the CPU) and marks every GPU check
"not run: no GPU", never "passed". Exit status: 1 when a check that ran failed, else 0.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = "not run: no GPU"


@dataclass
class Check:
    name: str
    status: str  # "passed", "failed", "warning" or "not run: <why>"
    detail: str = ""
    values: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Node:
    gpus: int
    work: Path  # scratch folder: data set, runs, exports
    model: str  # for the benchmark and the export

    @property
    def device(self) -> str:
        return "gpu:0" if self.gpus else "cpu"


# ---------------------------------------------------------------- helpers

def python(*args, timeout=600, env=None, **kw) -> subprocess.CompletedProcess:
    """This interpreter on the repository, warnings off, output captured."""
    full = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=full, **kw)


def last_json(text: str) -> dict:
    """The last line of `text` that parses as a JSON object (the tests use it too)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise RuntimeError(f"no JSON line in output:\n{text[-2000:]}")


def tiny_recipe(node: Node, out: Path, amp: bool, **extra) -> List[str]:
    """configs/demo.yaml shrunk to seconds on the generated data set."""
    o = {"Global.output_dir": out, "DataLoader.image_root": node.work / "data",
         "Arch.name": "DenseNetTiny", "Arch.class_num": 4, "DataLoader.image_size": 32,
         "DataLoader.resize_short": 36, "DataLoader.batch_size": 8, "Global.epochs": 3,
         "Global.print_interval": 1, "Global.deterministic": True,
         "Optimizer.lr.warmup_epoch": 0, "Global.visualdl": False}
    if amp:  # O2 fp16 from a loss scale that must overflow, so it moves within the run
        o.update({"AMP.use_amp": True, "AMP.level": "O2", "AMP.scale_loss": 2.0 ** 20,
                  "Global.max_skipped_steps": 60, "DataLoader.output_dtype": "float16"})
    o.update(extra)
    return ["-o"] + [f"{k}={v}" for k, v in o.items()]


def final_weights(run: Path) -> dict:
    from ppdpn.checkpoint import latest_checkpoint, load_checkpoint
    return load_checkpoint(latest_checkpoint(run / "checkpoints"))["model"]


def launch(node: Node, recipe: List[str], stop_at: str = "") -> subprocess.CompletedProcess:
    """launch.sh on this node (at most 2 processes); with stop_at, SIGUSR1 to launch.sh
    once train.log holds that text, as Slurm's --signal does."""
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONWARNINGS": "ignore",
           "NPROC": str(min(2, node.gpus) if node.gpus else 2)}
    proc = subprocess.Popen(["bash", str(ROOT / "launch.sh"), "configs/demo.yaml", *recipe],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    if stop_at:
        log = Path(recipe[recipe.index("-o") + 1].split("=", 1)[1]) / "train.log"
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            if log.is_file() and stop_at in log.read_text():
                proc.send_signal(signal.SIGUSR1)
                break
            time.sleep(0.2)
    out, _ = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def run_checks(funcs: List[Callable], node: Node) -> List[Check]:
    checks = []
    for func in funcs:
        try:
            checks.extend(func(node))
        except Exception as e:  # a check that crashes has failed; the others still run
            checks.append(Check(func.__name__.replace("check_", ""), "failed",
                                f"{type(e).__name__}: {str(e)[-400:]}"))
    return checks


# ---------------------------------------------------------------- the checks

def check_env(node: Node) -> List[Check]:
    import paddle
    from ppdpn import dist
    out = python("-c", "import paddle; paddle.utils.run_check()", timeout=300)
    text = (out.stdout + out.stderr).strip().splitlines()
    works = out.returncode == 0 and any("works well" in line for line in text)
    versions = {"paddle": paddle.__version__, "cuda": paddle.version.cuda(),
                "cudnn": paddle.version.cudnn(), "gpus": node.gpus,
                "names": [paddle.device.cuda.get_device_name(i) for i in range(node.gpus)]}
    checks = [Check("env.run_check", "passed" if works else "failed",
                    next((l for l in text if "works well" in l), " ".join(text[-2:])), versions)]
    wanted = dist.gpu_flags(amp=True, deterministic=False)
    if node.gpus:
        paddle.set_device(node.device)
        paddle.set_flags(wanted)
        got = paddle.get_flags(list(wanted))
        ok = all(got[k] == v for k, v in wanted.items())
        checks.append(Check("env.cudnn_flags", "passed" if ok else "failed", str(got), got))
    else:
        checks.append(Check("env.cudnn_flags", NO_GPU, f"an AMP run would set {wanted}"))
    return checks + [check_address()]


def default_route_address():
    """(IPv4 address, interface) of the default route: what other nodes reach this one by."""
    import psutil
    with open("/proc/net/route") as f:
        rows = [line.split() for line in f.read().splitlines()[1:]]
    iface = next((r[0] for r in rows if len(r) > 1 and r[1] == "00000000"), None)
    addrs = psutil.net_if_addrs().get(iface or "", [])
    found = next((a.address for a in addrs if a.family == socket.AF_INET), None)
    return (found, iface) if found else (None, None)


def check_address() -> Check:
    """The address Paddle's launcher finds for itself (gethostbyname(getfqdn())) against
    the one launch.sh passes as --host when this node is node 0 of a multi-node job: on
    Debian the first is often 127.0.1.1, which no other node can reach."""
    try:
        launcher_view = socket.gethostbyname(socket.getfqdn(socket.gethostname()))
    except OSError as e:
        launcher_view = f"unresolvable ({e})"
    address, iface = default_route_address()
    if address is None:
        return Check("env.address", "not run: no default route", f"launcher: {launcher_view}")
    dry = subprocess.run(["bash", str(ROOT / "launch.sh"), "configs/demo.yaml"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable,
                              "NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": address})
    words = dry.stdout.split()
    passed = words[words.index("--host") + 1] if "--host" in words else None
    values = {"launcher_view": launcher_view, "launch_sh_host": passed,
              "default_route": f"{address} ({iface})"}
    if passed != address:
        return Check("env.address", "failed", f"launch.sh --host {passed}, expected {address} "
                     f"({iface}): {dry.stderr.strip()[-300:]}", values)
    return Check("env.address", "passed", f"launch.sh --host {passed} ({iface}); the launcher "
                 f"alone would take {launcher_view}", values)


def check_dali(node: Node) -> List[Check]:
    if not node.gpus:
        return [Check("dali.mixed_handoff", NO_GPU)]
    import numpy as np
    import paddle
    from paddle.utils.dlpack import from_dlpack
    from ppdpn.config import DataConfig
    from ppdpn.data import build_loader
    from ppdpn.dist import DistContext
    local = int(os.environ.get("PADDLE_LOCAL_RANK", "0"))
    paddle.set_device(f"gpu:{local}")
    cfg = DataConfig(image_root=str(node.work / "data"), batch_size=8, num_workers=2,
                     image_size=32, resize_short=36)
    loader = build_loader(cfg, "val", DistContext(device=f"gpu:{local}", local_rank=local), 0)
    idx, valid = loader.plan.batches(0)
    busy = paddle.randn([4096, 4096])
    compared = 0
    for feeder, pipe, _ in loader.pipelines(0, idx, valid, 0):
        images, labels, ok = pipe.run()
        for _ in range(20):  # queue seconds of work on Paddle's stream before the handoff
            busy = paddle.matmul(busy, busy) * 1e-4
        seen = from_dlpack(images.as_tensor())
        same = np.array_equal(seen.numpy(), images.as_cpu().as_array())
        compared += 1
        if not same or "gpu" not in str(seen.place):
            return [Check("dali.mixed_handoff", "failed", f"batch differs or is on {seen.place}")]
    return [Check("dali.mixed_handoff", "passed", f"{compared} batch(es) equal on gpu:{local}")]


def check_train(node: Node) -> List[Check]:
    """The training paths through launch.sh: AMP O2 on a GPU, fp32 on a CPU."""
    import numpy as np
    amp, runs = bool(node.gpus), node.work / "runs"
    kind = "AMP O2 fp16" if amp else "fp32 (CPU: the AMP parts not run: no GPU)"
    whole = launch(node, tiny_recipe(node, runs / "whole", amp))
    if whole.returncode:
        return [Check("train.run", "failed", f"exit {whole.returncode}: {whole.stdout[-400:]}")]
    log = (runs / "whole" / "train.log").read_text()
    progress = [line for line in log.splitlines() if " img/s " in line]
    scales = [float(line.split(" scale ")[1].split()[0]) for line in progress if " scale " in line]
    checks = [Check("train.run", "passed", f"{kind}, {len(progress)} progress lines, loss finite",
                    {"final_scale": scales[-1] if scales else None})]
    if amp:
        moved = bool(scales) and scales[-1] < 2.0 ** 20
        checks.append(Check("train.loss_scale", "passed" if moved else "failed",
                            f"2^20 -> {scales[-1] if scales else None}"))
    else:
        checks.append(Check("train.loss_scale", NO_GPU))
    agree = "weights identical on all" in log and log.split("weights identical on all")[1].split(
        "\n")[0].strip().endswith("True")
    checks.append(Check("train.ranks_agree", "passed" if agree else "failed",
                        log.split("weights identical on all")[1].split("\n")[0].strip() if
                        "weights identical on all" in log else "no agreement line in train.log"))
    checks += check_resume(node, amp, runs, final_weights(runs / "whole"))
    best = runs / "whole" / "checkpoints" / "best.pdckpt"
    ev = python("train.py", "-c", "configs/demo.yaml", "--eval-only",
                *tiny_recipe(node, runs / "eval", amp, **{"Global.pretrained_model": best}))
    images = last_json(ev.stdout).get("images") if ev.returncode == 0 else None
    checks.append(Check("train.eval_only", "passed" if images == 24 else "failed",
                        f"exit {ev.returncode}, {images} val images"))
    return checks


def check_resume(node: Node, amp: bool, runs: Path, whole: dict) -> List[Check]:
    """SIGUSR1 mid-run -> checkpoint, exit 75 -> rerun resumes; same weights as `whole`.
    Then the stopped checkpoint resumed with AMP off."""
    import shutil
    import numpy as np
    cut = launch(node, tiny_recipe(node, runs / "cut", amp), stop_at="epoch 2/3 step 2/")
    if cut.returncode != 75:
        return [Check("train.sigusr1_resume", "failed", f"stop exited {cut.returncode}, not 75")]
    shutil.copytree(runs / "cut", runs / "amp_off")
    again = launch(node, tiny_recipe(node, runs / "cut", amp))
    got = final_weights(runs / "cut") if again.returncode == 0 else {}
    # Trainable weights must be bit-identical. BatchNorm running statistics may differ in
    # the last bits: the stop's checkpoint averages them over ranks one extra time, which
    # is exact in arithmetic but rounds differently.
    stats = [k for k in whole if k.endswith(("._mean", "._variance"))]
    diff = lambda keys: max((float(np.abs(got[k] - whole[k]).max()) for k in keys  # noqa: E731
                             if k in got), default=-1.0)
    weights, bn = diff([k for k in whole if k not in stats]), diff(stats)
    exact = again.returncode == 0 and set(got) == set(whole) and weights == 0.0 and bn < 1e-5
    checks = [Check("train.sigusr1_resume", "passed" if exact else "failed",
                    f"exit 75 then {again.returncode}; max |difference| from the uninterrupted "
                    f"run: weights {weights}, BN statistics {bn:.1e}")]
    off = launch(node, tiny_recipe(node, runs / "amp_off", False))
    checks.append(Check("train.resume_amp_off", "passed" if off.returncode == 0 else "failed",
                        f"exit {off.returncode}"))
    return checks


BENCH_VARIANTS = {  # name -> overrides; all but the first need a GPU
    "fp32_nchw": {},
    "o2_nhwc": {"AMP.use_amp": True, "AMP.level": "O2", "Arch.data_format": "NHWC",
                "DataLoader.output_layout": "NHWC", "DataLoader.output_dtype": "float16"},
    "bf16_o1": {"AMP.use_amp": True, "AMP.level": "O1", "AMP.dtype": "bfloat16"},
    "o2_recompute": {"AMP.use_amp": True, "AMP.level": "O2", "Arch.recompute": True},
}


def check_bench(node: Node) -> List[Check]:
    checks = []
    size = 224 if node.gpus else 64  # the CPU's figure is a smoke test, not a speed
    base = {"Arch.name": node.model, "Arch.class_num": 1000, "DataLoader.image_size": size,
            "DataLoader.resize_short": size * 8 // 7,
            "DataLoader.batch_size": 64 if node.gpus else 4, "Global.visualdl": False,
            "Global.output_dir": node.work / "bench", "DataLoader.image_root": node.work / "data"}
    for name, extra in BENCH_VARIANTS.items():
        if extra and not node.gpus:
            checks.append(Check(f"bench.{name}", NO_GPU))
            continue
        checks.append(bench_one(f"bench.{name}", {**base, **extra}, []))
    small = {**base, "Arch.class_num": 4, "DataLoader.image_size": 32, "DataLoader.resize_short": 36}
    checks.append(bench_one("bench.real_data", small, ["--real-data"]))
    return checks


def bench_one(name: str, overrides: dict, extra_args: List[str]) -> Check:
    args = ["train.py", "-c", "configs/demo.yaml", "--benchmark", "--warmup", "3", "--steps",
            "10", *extra_args, "-o"] + [f"{k}={v}" for k, v in overrides.items()]
    out = python(*args, timeout=900)
    if out.returncode:
        return Check(name, "failed", f"exit {out.returncode}: {out.stderr.strip()[-300:]}")
    r = last_json(out.stdout)
    keep = {k: r[k] for k in ("img_s", "step_ms", "data_wait_ms", "peak_mem_mb", "device")}
    return Check(name, "passed", f"{r['img_s']} img/s, step {r['step_ms']} ms, data wait "
                 f"{r['data_wait_ms']} ms, peak {r['peak_mem_mb']} MB", keep)


def check_export(node: Node) -> List[Check]:
    """Export the trained tiny model, predict the val images with Paddle Inference on the
    device (and TensorRT fp32/fp16 on a GPU): the same top-1 as dygraph."""
    from ppdpn import predict, trt
    best = node.work / "runs" / "whole" / "checkpoints" / "best.pdckpt"
    out = node.work / "export"
    overrides = ["Arch.name=DenseNetTiny", "Arch.class_num=4", "DataLoader.image_size=32",
                 "DataLoader.resize_short=36", f"Global.pretrained_model={best}"]
    exp = python("-m", "ppdpn.export", "-c", "configs/demo.yaml", "--out", str(out),
                 *[arg for o in overrides for arg in ("-o", o)])
    if exp.returncode:
        return [Check("export.paddle", "failed", f"exit {exp.returncode}: {exp.stderr[-300:]}")]
    files = sorted((node.work / "data" / "val").rglob("*.jpg"))[:16]
    reference = dygraph_top1(best, out, files)
    meta = predict.read_model_dir(out, "paddle")
    checks = []
    variants = [("export.paddle", None)] + [(f"export.trt_{p}", p) for p in ("fp32", "fp16")]
    for name, precision in variants:
        if precision and not node.gpus:
            checks.append(Check(name, NO_GPU))
            continue
        opts = trt.TrtOptions(precision, 8, 32, "image") if precision else None
        run = predict.create_runner(out, "paddle", node.device, trt=opts,
                                    trt_cache=node.work / "trt")
        got = [p["topk"][0]["class_id"] for p in predict.predict_files(run, meta, files)[0]]
        same = sum(a == b for a, b in zip(got, reference))
        checks.append(Check(name, "passed" if same == len(files) else "failed",
                            f"top-1 equal to dygraph on {same}/{len(files)} images ({node.device})"))
    return checks


def dygraph_top1(checkpoint: Path, model_dir: Path, files) -> list:
    """Top-1 of the dygraph model on the export's own preprocessing."""
    import numpy as np
    import paddle
    from ppdpn import predict
    from ppdpn.models import create_model
    from ppdpn.preprocess import decode_image, transform_from_spec
    model = create_model("DenseNetTiny", num_classes=4, pretrained=str(checkpoint))
    model.eval()
    spec = predict.read_model_dir(model_dir, "paddle")["preprocess"]
    batch = np.stack([transform_from_spec(decode_image(f), spec) for f in files])
    with paddle.no_grad():
        return model(paddle.to_tensor(batch)).numpy().argmax(1).tolist()


def print_table(checks: List[Check]) -> None:
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"{c.name:<{width}}  {c.status:<16}  {c.detail}")


def main(argv=None) -> int:
    from ppdpn.dist import gpu_count
    p = argparse.ArgumentParser(prog="python -m ppdpn.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="benchmark model (default DPN68 on a GPU, "
                   "DPNTiny on a CPU)")
    p.add_argument("--keep", default=None, help="keep the scratch folder here")
    args = p.parse_args(argv)
    gpus = gpu_count()
    work = Path(args.keep or tempfile.mkdtemp(prefix="ppdpn-gpu-check-"))
    node = Node(gpus, work, args.model or ("DPN68" if gpus else "DPNTiny"))
    made = python("-m", "data.make_demo", "--out", str(work / "data"), "--classes", "4",
                  "--train-per-class", "16", "--val-per-class", "6", "--seed", "3")
    if made.returncode:
        print(f"error: cannot make the check's data set: {made.stderr[-500:]}", file=sys.stderr)
        return 1
    started = time.time()
    checks = run_checks([check_env, check_dali, check_train, check_bench, check_export], node)
    print_table(checks)
    failed = [c.name for c in checks if c.status == "failed"]
    print(json.dumps({"gpus": gpus, "seconds": round(time.time() - started, 1), "failed": failed,
                      "work": str(work), "checks": [asdict(c) for c in checks]}, default=str))
    if not args.keep:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
