"""--report-to: the run's metrics, config and files sent to the dashboards users watch, besides metrics.jsonl.

One small interface, after torchtune's metric_logging: a tracker has log(metrics, step), log_config(config),
log_artifact(path) and close(). Each backend's package is imported only when asked for (`require` checks them
all before the run loads anything, so a missing one is one line naming the package, not a failure at the end);
Trackers fans the calls out to every backend chosen. Only rank 0 reports (loop.run opens none elsewhere).

    tensorboard  event files under <out>/tensorboard/ (torch.utils.tensorboard's SummaryWriter); the config as text
    mlflow       a run in --mlflow-tracking-uri, else $MLFLOW_TRACKING_URI, else MLflow's default (a local
                 sqlite:///file.db needs no server: sqlalchemy and alembic beside mlflow-skinny), experiment
                 $MLFLOW_EXPERIMENT_NAME (default lora_engine); config as params and config.json; the run tagged
                 lora_engine.run_dir, which `registry publish --mlflow-register` links the model version to
    wandb        a run in project $WANDB_PROJECT (default lora_engine); WANDB_MODE=offline writes under <out>/wandb
                 (run-<id>.wandb, the history; files/, the artifacts), which `wandb sync` uploads later
    trackio      a run in project $TRACKIO_PROJECT (default lora_engine) of trackio's local store ($TRACKIO_DIR, default
                 ~/.cache/huggingface/trackio: where `trackio show` looks; a Space only with $TRACKIO_SPACE_ID); the
                 config goes with the first metrics, files as trackio artifacts

Names, as transformers' trainer reports them: train/loss, train/grad_norm, train/learning_rate, train/epoch,
train/tokens_per_second, train/target_tokens_seen and the objective's own (DPO's rewards, GRPO's reward names)
as train/<name>; eval/loss and eval/perplexity (the target responses), eval/general_loss, eval/general_perplexity,
eval/preference_loss, eval/preference_reward_accuracy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import os
import time
from pathlib import Path

BACKENDS = ("tensorboard", "mlflow", "wandb", "trackio")
# What `require` imports for each backend (torch.utils.tensorboard needs the tensorboard package itself).
_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "trackio": "trackio"}
# metrics.jsonl's names -> the trackers'; keys not named here pass as train/<key> (the objective's own).
_TRAIN_NAMES = {"loss": "loss", "grad_norm": "grad_norm", "lr": "learning_rate", "epoch": "epoch",
                "tokens_per_s": "tokens_per_second", "target_tokens_seen": "target_tokens_seen"}
_NOT_METRICS = {"step", "tokens", "targets", "skipped"}  # counts of this step, not curves anyone watches


def parse_report_to(value: str) -> tuple[str, ...]:
    """--report-to as given ("none", "tensorboard,wandb") -> the backends, in order, each once."""
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    bad = [n for n in names if n not in (*BACKENDS, "none")]
    if bad or not names or ("none" in names and len(names) > 1):
        raise ValueError(f"--report-to must be none or a comma-separated list of {', '.join(BACKENDS)}, "
                         f"got {value!r}")
    return tuple(dict.fromkeys(n for n in names if n != "none"))


def require(value: str) -> None:
    """ImportError-free check before a run: each backend's package importable, else one line naming it."""
    from lora_engine.cli import CliError

    for name in parse_report_to(value):
        try:
            importlib.import_module(_MODULES[name])
        except ImportError as e:
            raise CliError(f"--report-to {name}: the {_MODULES[name]} package is not installed ({e}); "
                           f"pip install {_MODULES[name]}, or leave {name} out of --report-to") from e


def train_metrics(row: dict) -> dict[str, float]:
    """A metrics.jsonl row -> the trackers' names (val_* as eval/*, with the perplexity of val_loss)."""
    out = {}
    for k, v in row.items():
        if k in _NOT_METRICS or not isinstance(v, int | float) or isinstance(v, bool) or v is None:
            continue
        if k.startswith("val_"):
            out[f"eval/{k.removeprefix('val_')}"] = float(v)
            if k == "val_loss":
                out["eval/perplexity"] = math.exp(min(v, 700.0))
        else:
            out[f"train/{_TRAIN_NAMES.get(k, k)}"] = float(v)
    return out


def eval_metrics(ev: dict) -> dict[str, float]:
    """An evaluation (evaluate.run_eval's parts) -> eval/loss, eval/perplexity, eval/general_loss, ..."""
    out = {}
    for part, vals in ev.items():
        if part == "suite" or not isinstance(vals, dict):
            continue
        prefix = "eval/" if part == "target" else f"eval/{part}_"
        for k, v in vals.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[prefix + ("perplexity" if k == "ppl" else k)] = float(v)
    return out


class TensorBoard:
    def __init__(self, out: Path, run_name: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))

    def log(self, metrics: dict, step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def log_config(self, config: dict) -> None:
        # Markdown code block: TensorBoard's text plugin renders the JSON as written.
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")

    def log_artifact(self, path: Path) -> None:
        pass  # TensorBoard keeps no files; the run folder has them

    def close(self) -> None:
        self.writer.close()


class MLflow:
    """Through an MlflowClient on the URI rather than mlflow's fluent API, whose active run and tracking URI are
    process-wide: a run's URI is the run's alone."""

    def __init__(self, out: Path, run_name: str, tracking_uri: str | None = None):
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.client, self.Metric, self.Param = MlflowClient(tracking_uri), Metric, Param
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "lora_engine")
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        # lora_engine.run_dir: how `registry publish --mlflow-register` finds the run that trained a version
        self.run_id = self.client.create_run(exp_id, run_name=run_name,
                                             tags={"lora_engine.run_dir": str(out.resolve())}).info.run_id

    def log(self, metrics: dict, step: int) -> None:
        # MLflow's metric names may not hold some characters; "/" is allowed.
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(k, v, now, step) for k, v in metrics.items()])

    def log_config(self, config: dict) -> None:
        # MLflow caps a param at 500 chars (log_batch sends them in chunks of its own limit)
        # a tuple (--stop) as the list config.json holds, so the param reads as the saved config does
        self.client.log_batch(self.run_id, params=[self.Param(k, str(list(v) if isinstance(v, tuple) else v)[:500])
                                                   for k, v in config.items()])
        self.client.log_dict(self.run_id, config, "config.json")

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandB:
    def __init__(self, out: Path, run_name: str):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lora_engine"), name=run_name, dir=str(out))

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_artifact(self, path: Path) -> None:
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def close(self) -> None:
        self.run.finish()


class Trackio:
    def __init__(self, out: Path, run_name: str):
        import trackio

        # embed: no dashboard server started for a notebook; the system monitors off, as the other backends have none
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "lora_engine"), name=run_name, embed=False,
                                auto_log_gpu=False, auto_log_cpu=False)

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def log_config(self, config: dict) -> None:
        self.run.config.update(config)  # trackio stores the run's config with its first metrics

    def log_artifact(self, path: Path) -> None:
        self.run.log_artifact(path)

    def close(self) -> None:
        self.run.finish()


_CLASSES = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB, "trackio": Trackio}


class Trackers:
    """The backends of --report-to as one tracker (none: every call does nothing)."""

    def __init__(self, report_to: str = "none", out: Path | None = None, run_name: str = "",
                 mlflow_tracking_uri: str | None = None):
        self.backends = []
        try:
            for name in parse_report_to(report_to):
                kw = {"tracking_uri": mlflow_tracking_uri} if name == "mlflow" else {}
                self.backends.append(_CLASSES[name](Path(out), run_name, **kw))
        except BaseException:
            self.close()
            raise

    def log(self, metrics: dict, step: int) -> None:
        if metrics:
            for b in self.backends:
                b.log(metrics, step)

    def log_config(self, config: dict) -> None:
        for b in self.backends:
            b.log_config(config)

    def log_artifact(self, path: Path) -> None:
        if Path(path).is_file():
            for b in self.backends:
                b.log_artifact(Path(path))

    def close(self) -> None:
        for b in self.backends:
            b.close()
        self.backends = []


@contextlib.contextmanager
def opened(r):
    """The trackers of a run (a state.Run; none on ranks other than 0), given its config and evaluation before
    training as they open; closed when the run ends, however it ends."""
    tr = Trackers(r.cfg.report_to, r.out, r.out.name, r.cfg.mlflow_tracking_uri) if r.dist.main else Trackers()
    try:
        tr.log_config(dataclasses.asdict(r.cfg))
        before = r.manifest.get("eval", {}).get("before")
        if before:
            tr.log(eval_metrics(before), 0)
        yield tr
    finally:
        tr.close()


def report_end(tr: Trackers, r, step: int) -> None:
    """The evaluation after training (a completed run) and the run's files: loss.png, run.json, config.yaml."""
    after = r.manifest.get("eval", {}).get("after")
    if r.manifest.get("status") == "completed" and after:
        tr.log(eval_metrics(after), step)
    for name in ("loss.png", "run.json", "config.yaml", "metrics.jsonl"):
        tr.log_artifact(r.out / name)
