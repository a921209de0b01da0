"""Finding the ranks a paddle.distributed.launch process started: for the tests and the
soak benchmark, which signal or kill one rank (psutil is a test dependency only)."""
import psutil


def launcher_workers(launcher_pid: int) -> dict:
    """{rank: pid} of the train.py processes a paddle.distributed.launch process has
    started so far (found by their PADDLE_TRAINER_ID); {} once the launcher is gone."""
    try:
        children = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.Error:
        return {}
    found = {}
    for child in children:
        try:
            rank = child.environ().get("PADDLE_TRAINER_ID")
            if rank is not None and "train.py" in " ".join(child.cmdline()):
                found[int(rank)] = child.pid
        except psutil.Error:
            continue  # exited meanwhile
    return found
