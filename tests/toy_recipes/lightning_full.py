"""A real LightningModule on the digits data that uses what Lightning's Trainer gives a module:
every configure_optimizers form, self.log / self.log_dict with their options, self.trainer,
self.global_step, self.current_epoch, self.device, and the hooks (recorded to a file)."""
import json
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from recipes.digits import data  # noqa: F401  (the same data as the digits recipe)


@dataclass
class Config:
    hidden: int = 32
    lr: float = 0.05
    val_fraction: float = 0.2
    split_seed: int = 0
    optimizers: str = "one"  # one | list | lists | dict | dict_step | dict_epoch | two | manual | trainer_attr
    record_to: str = ""  # a JSON file for the hooks called and what the module saw


class DigitsModule(pl.LightningModule):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.net = nn.Sequential(nn.Linear(64, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 10))
        self.calls = []
        self.seen = []
        if cfg.optimizers == "manual":
            self.automatic_optimization = False

    def record(self, name):
        if not self.calls or self.calls[-1] != name:  # per-batch hooks once per run of them
            self.calls.append(name)

    def training_step(self, batch, batch_idx):
        x, y = batch
        assert x.device == self.device
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("seen_max", x.abs().max(), on_step=False, on_epoch=True, reduce_fx="max", sync_dist=True)
        self.seen.append((self.global_step, self.current_epoch, batch_idx))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log_dict({"val_acc": (logits.argmax(-1) == y).float().mean(),
                       "val_n": torch.tensor(float(len(y)), device=self.device)}, reduce_fx="mean")
        self.log("val_n_sum", float(len(y)), reduce_fx="sum")

    def on_validation_epoch_end(self):
        self.record("on_validation_epoch_end")
        self.log("epoch_end_marker", 1.0)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.cfg.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        form = self.cfg.optimizers
        if form == "list":
            return [opt]
        if form == "lists":
            return [opt], [sched]
        if form == "dict":
            return {"optimizer": opt, "lr_scheduler": sched}
        if form == "dict_step":
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if form == "dict_epoch":
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch", "frequency": 1}}
        if form == "two":
            return [opt, torch.optim.SGD(self.parameters(), lr=0.1)]
        return opt

    def on_fit_end(self):
        self.record("on_fit_end")
        if self.cfg.record_to and self.trainer.is_global_zero:
            with open(self.cfg.record_to, "w") as f:
                json.dump({"calls": self.calls, "seen": self.seen, "world_size": self.trainer.world_size,
                           "max_steps": self.trainer.max_steps,
                           "estimated_stepping_batches": self.trainer.estimated_stepping_batches}, f)


for _hook in ("on_fit_start", "on_train_start", "on_train_epoch_start", "on_train_epoch_end", "on_train_batch_start",
              "on_train_batch_end", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
              "on_before_zero_grad", "on_validation_start", "on_validation_epoch_start", "on_validation_end",
              "on_validation_batch_start", "on_validation_batch_end",
              "on_train_end", "on_save_checkpoint", "on_load_checkpoint", "setup", "configure_model"):
    setattr(DigitsModule, _hook, (lambda name: lambda self, *args: self.record(name))(_hook))


class ReadsCallbackMetrics(DigitsModule):
    def on_train_epoch_end(self):
        print(self.trainer.callback_metrics)  # not offered by launcher


def model(cfg: Config):
    return (ReadsCallbackMetrics if cfg.optimizers == "trainer_attr" else DigitsModule)(cfg)
