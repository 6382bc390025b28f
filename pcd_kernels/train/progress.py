"""What a run shows and leaves behind: a progress line, ``log.jsonl`` / ``log.csv``, ``loss.png``."""
import csv
import io
import json
import os
import sys
import time
from typing import Dict, List

from pcd_kernels.train.errors import TrainError
from pcd_kernels.train.files import atomic_write, reporting_write_errors, write_text

COLUMNS = ("step", "epoch", "loss", "lr", "images_per_s")


class Progress:
    """A one-line progress bar (step, loss, lr, images/s, ETA), redrawn in place on a terminal and
    printed every ``every`` steps elsewhere (log files of batch jobs)."""

    def __init__(self, total: int, start: int, enabled: bool = True, every: int = 10, stream=None):
        self.total, self.start, self.enabled, self.every = total, start, enabled, every
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.began = time.perf_counter()
        self.drawn = False

    def update(self, row: Dict) -> None:
        if not self.enabled:
            return
        done, width = row["step"], 24
        filled = int(width * done / max(self.total, 1))
        rate = (done - self.start) / max(time.perf_counter() - self.began, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else 0.0
        line = (f"[{'#' * filled}{'.' * (width - filled)}] step {done}/{self.total} | loss {row['loss']:.4f} | "
                f"lr {row['lr']:.4g} | {row['images_per_s']:.0f} img/s | eta {_duration(eta)}")
        if self.tty:
            self.stream.write("\r" + line + "\033[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.enabled and self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class MetricLog:
    """``log.jsonl`` and ``log.csv`` with one row per logged step. A resumed run first drops the rows
    after its checkpoint's step (logged by the interrupted run after its last save), and a torn last
    line, then rewrites both files from the rows it kept."""

    def __init__(self, folder: str, enabled: bool = True, keep_until: int = 0):
        self.jsonl, self.csv = os.path.join(folder, "log.jsonl"), os.path.join(folder, "log.csv")
        self.enabled = enabled
        self.rows: List[Dict] = []
        if not enabled:
            return
        if keep_until > 0 and os.path.exists(self.jsonl):
            self.rows = [row for row in read_rows(self.jsonl) if row["step"] <= keep_until]
        write_text(self.jsonl, "".join(map(_jsonl_line, self.rows)))
        write_text(self.csv, _csv_lines(self.rows, header=True))

    def append(self, row: Dict) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        for path, text in ((self.jsonl, _jsonl_line(row)), (self.csv, _csv_lines([row]))):
            with reporting_write_errors(path), open(path, "a", newline="") as f:
                f.write(text)


def read_rows(path: str) -> List[Dict]:
    """The rows of a ``log.jsonl``. A run killed while appending leaves a torn last line, which is
    dropped; any other line that is not a row is an error."""
    with open(path, errors="replace") as f:
        lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
    rows = []
    for number, line in lines:
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a row")
        except ValueError as error:
            if number == lines[-1][0]:
                break
            raise TrainError(f"{path}: line {number} is not a log row; fix or delete that line (or the whole log: "
                             "the checkpoint alone resumes the run)") from error
        rows.append(row)
    return rows


def _jsonl_line(row: Dict) -> str:
    return json.dumps(row) + "\n"


def _csv_lines(rows: List[Dict], header: bool = False) -> str:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, COLUMNS)
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def pyplot(path: str):
    """matplotlib.pyplot without a display, or None (with a note that ``path`` was not drawn) when
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed, so {path} was not drawn (pip install matplotlib)",
              file=sys.stderr)
        return None
    return plt


def save_figure(plt, fig, path: str) -> None:
    """Writes ``fig`` as a PNG atomically, then closes it."""
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)


def plot_loss(rows: List[Dict], path: str) -> bool:
    """The loss curve as a PNG; False (with a note) when matplotlib is not installed."""
    plt = pyplot(path)
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean since the previous point)")
    ax.set_title("PCD distillation loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(plt, fig, path)
    return True
