"""Rank-0 reporting: progress lines, train.log, metrics.jsonl, VisualDL, the curve plot;
Progress turns the training loop's windows into those lines and records."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


class RunLogger:
    """Everything a run reports. On ranks other than 0 every method does nothing."""

    def __init__(self, out_dir, enabled: bool, use_visualdl: bool = True):
        self.enabled = enabled
        self._write_failed = False
        self.out = Path(out_dir)
        self.tty = sys.stdout.isatty()
        self.writer = None
        self._file = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self._file = open(self.out / "train.log", "a", buffering=1)
        if use_visualdl:
            from visualdl import LogWriter
            self.writer = LogWriter(logdir=str(self.out / "vdl"))

    # -------------------------------------------------------------- text
    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            sys.stdout.write("\r\033[K")
        print(msg, flush=True)
        self._write(self._file, time.strftime("%Y-%m-%d %H:%M:%S ") + msg + "\n")

    def progress(self, *, epoch, epochs, step, steps, global_step, total_steps, loss, lr,
                 img_s, data_frac, loss_scale, elapsed, done_in_run):
        if not self.enabled:
            return
        eta = elapsed / max(done_in_run, 1) * (total_steps - global_step)
        line = (f"epoch {epoch + 1}/{epochs} step {step}/{steps} loss {loss:.4f} "
                f"lr {lr:.5f} {img_s:.1f} img/s data {100 * data_frac:.0f}% "
                + (f"scale {loss_scale:g} " if loss_scale is not None else "")
                + f"ETA {_fmt_time(eta)}")
        self._write(self._file, time.strftime("%Y-%m-%d %H:%M:%S ") + line + "\n")
        if self.tty:  # a one-line bar that rewrites itself
            width = 30
            filled = int(width * step / max(steps, 1))
            sys.stdout.write("\r\033[K[" + "#" * filled + "." * (width - filled) + "] " + line)
            sys.stdout.flush()
        else:
            print(line, flush=True)
        values = {"loss": loss, "lr": lr, "img_per_s": img_s}
        if loss_scale is not None:
            values["loss_scale"] = loss_scale
        self.scalars("train", global_step, values)

    def _write(self, f, text: str) -> None:
        """Logs are not worth a crash: a full disk is reported once and training goes on
        (checkpoint writes, which matter, fail loudly in ppdpn/checkpoint.py)."""
        try:
            f.write(text)
            f.flush()
        except OSError as e:
            self._report_write_error(getattr(f, "name", self.out), e)

    def _report_write_error(self, path, e: OSError) -> None:
        if not self._write_failed:
            self._write_failed = True
            print(f"[log] cannot write {path}: {e.strerror or e}; logging to files stops "
                  f"being complete", file=sys.stderr, flush=True)

    # -------------------------------------------------------------- structured
    def scalars(self, prefix: str, step: int, values: dict) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if v is not None and np.isfinite(v):
                self.writer.add_scalar(tag=f"{prefix}/{k}", step=int(step), value=float(v))

    def epoch_record(self, record: dict) -> None:
        if not self.enabled:
            return
        path = self.out / "metrics.jsonl"
        try:
            # After a kill mid-write the file may end inside a line: start a fresh one.
            torn = path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
            with open(path, "a") as f:
                self._write(f, ("\n" if torn else "") + json.dumps(record) + "\n")
        except OSError as e:
            self._report_write_error(path, e)

    def text(self, tag: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag=tag, step=0, text_string=text)

    def images(self, tag: str, batch_chw: np.ndarray, mean, std, limit: int = 4) -> None:
        """A few (augmented) input images, de-normalised to uint8 HWC."""
        if self.writer is None:
            return
        for i, chw in enumerate(batch_chw[:limit]):
            hwc = chw.transpose(1, 2, 0) * np.asarray(std) + np.asarray(mean)
            img = np.clip(hwc * 255.0, 0, 255).astype(np.uint8)
            self.writer.add_image(tag=f"{tag}/{i}", img=img, step=0)

    def records(self) -> list:
        """metrics.jsonl's per-epoch records, in order (rank 0; [] elsewhere)."""
        path = self.out / "metrics.jsonl"
        if not self.enabled or not path.is_file():
            return []
        rows = []
        for line in path.read_text(errors="replace").splitlines():
            try:  # a line half-written by a killed run is skipped, not fatal
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "epoch" in row:
                rows.append(row)
        return rows

    def summary(self, elapsed_s: float) -> str:
        """The run's last line in words: the best evaluation, the last one and the time."""
        evals = [r for r in self.records() if r.get("eval_top1") is not None]

        def said(r: dict) -> str:
            return (f"top1 {r['eval_top1']:.4f} top5 {r['eval_top5']:.4f} loss {r['eval_loss']:.4f} "
                    f"(after {r['epoch']} whole epoch(s), global step {r['global_step']})")
        took = f"{_fmt_time(elapsed_s)} in this run"
        if not evals:
            return f"[run] finished: no evaluation recorded; {took}"
        best = max(evals, key=lambda r: r["eval_top1"])  # the first of equals
        last = evals[-1]
        if last is best:
            return f"[run] finished: best and last {said(best)}; {took}"
        return f"[run] finished: best {said(best)}; last {said(last)}; {took}"

    def plot_curves(self) -> Path | None:
        """loss, LR and top-1 per epoch from metrics.jsonl into curves.png."""
        rows = self.records()
        if not rows:
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
        ep = [r["epoch"] for r in rows]
        for ax, key, title in zip(axes, ("train_loss", "lr", "eval_top1"),
                                  ("train loss", "learning rate (end of epoch)", "eval top-1")):
            pts = [(e, r[key]) for e, r in zip(ep, rows) if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o")
            ax.set_title(title)
            ax.set_xlabel("epoch")
        fig.tight_layout()
        out = self.out / "curves.png"
        try:
            fig.savefig(out, dpi=90)
        except OSError as e:
            self._report_write_error(out, e)
            out = None
        plt.close(fig)
        return out

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self._file is not None:
            self._file.close()
            self._file = None


def planned_steps(g, steps_per_epoch: int) -> int:
    """Optimizer steps the run trains in all: Global.epochs of them, or Global.max_steps."""
    total = g.epochs * steps_per_epoch
    return min(total, g.max_steps) if g.max_steps else total


class Progress:
    """Turns the engine's per-window sums into progress lines and per-epoch records."""

    def __init__(self, cfg, steps_per_epoch: int, global_batch: int, lr_sched, state, log):
        self.cfg, self.steps_per_epoch, self.lr_sched, self.log = cfg, steps_per_epoch, lr_sched, log
        self.global_batch = global_batch
        self.start_step = state.global_step
        self.t_start = self.t_window = self.t_epoch = time.perf_counter()
        self.state = state

    def overflow(self, state, skipped: int) -> None:
        self.log.info(f"[amp] overflow: skipped {skipped} step(s) up to step {state.global_step}")

    def report(self, state, count: int, values: dict) -> None:
        now = time.perf_counter()
        img_s = count * self.global_batch / max(now - self.t_window, 1e-9)
        busy = values["data_s"] + values["compute_s"]
        self.t_window = now
        state.epoch_loss_sum += values["loss"] * count
        state.epoch_loss_steps += count
        self.log.progress(epoch=state.epoch, epochs=self.cfg.Global.epochs, step=state.step_in_epoch,
                          steps=self.steps_per_epoch, global_step=state.global_step,
                          total_steps=planned_steps(self.cfg.Global, self.steps_per_epoch),
                          loss=values["loss"], lr=self.lr_sched.get_lr(), img_s=img_s,
                          data_frac=values["data_s"] / max(busy, 1e-9),
                          loss_scale=values["loss_scale"], elapsed=now - self.t_start,
                          done_in_run=state.global_step - self.start_step)

    def end_epoch(self, metrics) -> None:
        now = time.perf_counter()
        st = self.state
        n = st.epoch_loss_steps
        train_loss = st.epoch_loss_sum / n if n else None
        record = {"epoch": self.state.epoch, "global_step": self.state.global_step,
                  "train_loss": train_loss, "lr": self.lr_sched.get_lr(),
                  "epoch_time_s": round(now - self.t_epoch, 3)}
        if metrics is not None:
            record.update({f"eval_{k}": v for k, v in metrics.items()})
            # after an epoch's end, or mid-epoch at Global.max_steps
            where = (f"end of epoch {st.epoch}" if st.step_in_epoch == 0 else
                     f"epoch {st.epoch + 1} step {st.step_in_epoch}/{self.steps_per_epoch}")
            self.log.info(f"[eval] {where} (global step {st.global_step}): top1 {metrics['top1']:.4f} "
                          f"top5 {metrics['top5']:.4f} loss {metrics['loss']:.4f} "
                          f"({metrics['images']} images)")
        self.log.epoch_record(record)
        if st.step_in_epoch == 0:  # a whole epoch: the next one starts its own sum
            st.epoch_loss_sum, st.epoch_loss_steps = 0.0, 0
        self.t_epoch = now


def log_sample_images(loader, log, cfg) -> None:
    """A few augmented training inputs to VisualDL at the start of a run."""
    if log.writer is None:
        return
    from ppdpn.preprocess import IMAGENET_MEAN, IMAGENET_STD
    for images, _, _ in loader.epoch(0):
        arr = images.numpy()
        if cfg.DataLoader.output_layout == "NHWC":
            arr = arr.transpose(0, 3, 1, 2)
        log.images("train/input", arr.astype(np.float32), IMAGENET_MEAN, IMAGENET_STD)
        break
