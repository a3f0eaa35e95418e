"""Run output on the global master: a tqdm bar, wandb (disabled | offline | online) and, always,
`metrics.jsonl` in run.output_dir (one JSON object per log event, keys like "train/loss").
A resumed run continues the wandb run whose id is stored in run.output_dir; a fresh one starts
a new wandb run and stores its id.

Values arrive as host numbers (the trainer reads device values in step closures); other
replicas get a logger that does nothing, so the trainer calls it unconditionally.
"""

from __future__ import annotations

import json
import os
import time

from tqdm import tqdm

from kan_vit.training.config import Config, to_dict
from kan_vit.utils.atomic_files import atomic_outputs

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id.txt"


class RunLogger:
    def __init__(self, cfg: Config, master: bool, start_step: int):
        self.master = master
        self.images_per_step = cfg.data.train_batch_size
        self.last_time, self.last_step = time.perf_counter(), start_step
        if not master:
            return
        self.path = os.path.join(cfg.run.output_dir, METRICS_FILE)
        _truncate_after(self.path, start_step)  # a resumed run rewrites what came after its checkpoint
        self.bar = tqdm(total=cfg.schedule.training_steps, initial=start_step, dynamic_ncols=True, desc="train")
        self.wandb = None
        if cfg.run.wandb != "disabled":
            import wandb

            id_path = os.path.join(cfg.run.output_dir, WANDB_ID_FILE)
            resume_id = None
            if start_step > 0 and os.path.exists(id_path):  # resumed from a checkpoint: the same wandb run
                with open(id_path, encoding="utf-8") as file:
                    resume_id = file.read().strip()
            self.wandb = wandb.init(
                project=cfg.run.project,
                name=cfg.run.name,
                config=to_dict(cfg),
                mode=cfg.run.wandb,
                dir=cfg.run.output_dir,
                id=resume_id,
                resume="allow" if resume_id else None,
            )
            if resume_id is None:  # a new run: its id for the next resume
                with atomic_outputs(id_path) as (tmp,):
                    with open(tmp, "w", encoding="utf-8") as file:
                        file.write(self.wandb.id + "\n")

    def train(self, step: int, metrics: dict) -> None:
        """Interval metrics at optimizer update `step`; adds img/s over the interval."""
        now = time.perf_counter()
        images = (step - self.last_step) * self.images_per_step
        metrics = dict(metrics, **{"perf/img_per_sec": images / max(now - self.last_time, 1e-9)})
        self.last_time, self.last_step = now, step
        if not self.master:
            return
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(
            {
                "img/s": f"{metrics['perf/img_per_sec']:.0f}",
                "loss": f"{metrics['train/loss']:.4f}",
                "lr": f"{metrics['train/lr']:.2e}",
            }
        )
        self._write(step, metrics)

    def eval(self, step: int, metrics: dict) -> None:
        if not self.master:
            return
        shown = (f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        self.bar.write(f"step {step}: " + ", ".join(shown))  # counts stay integers
        self._write(step, metrics)

    def info(self, message: str) -> None:
        if self.master:
            self.bar.write(message)

    def close(self) -> None:
        if self.master:
            self.bar.close()
            if self.wandb is not None:
                self.wandb.finish()

    def _write(self, step: int, metrics: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)


def read_metrics(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def _truncate_after(path: str, step: int) -> None:
    """Drop the records after `step`, atomically: a crash here keeps the whole old file."""
    if not os.path.exists(path):
        return
    kept = [record for record in read_metrics(path) if record["step"] <= step]
    with atomic_outputs(path) as (tmp,):
        with open(tmp, "w", encoding="utf-8") as file:
            file.writelines(json.dumps(record) + "\n" for record in kept)
