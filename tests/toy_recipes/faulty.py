"""The digits recipe with faults to inject: a disk that fills up during a save, a save slow
enough to be killed mid-way, a validation that crashes.

The save faults patch torch.distributed.checkpoint's file writer in the process that builds
the data (every worker does), counting this process's saves.
"""
import errno
import os
import time
from dataclasses import dataclass

from torch.distributed.checkpoint import filesystem

from recipes import digits


@dataclass
class Config(digits.Config):
    full_disk_at_save: int = 0  # the n-th save of this process runs out of space after its first items
    full_disk_rank: int = 1
    slow_save_at: int = 0  # the n-th save takes slow_save_s per item written
    slow_save_s: float = 0.0
    fail_validation: bool = False
    say_in_validation: str = ""  # printed without flush: block-buffered when stdout is a pipe


SETTINGS = {}
saves = 0
items = 0


def model(cfg):
    return digits.model(cfg)


def data(cfg):
    if not SETTINGS:
        SETTINGS.update(vars(cfg))
        install_writer_faults()
    return digits.data(cfg)


def loss(model, batch):
    return digits.loss(model, batch)


def eval_step(model, batch):
    if SETTINGS["fail_validation"]:
        raise RuntimeError("deliberate failure in validation")
    if SETTINGS["say_in_validation"]:
        print(SETTINGS["say_in_validation"], end=" ")
    return digits.eval_step(model, batch)


def install_writer_faults():
    write_data, write_item = filesystem._FileSystemWriter.write_data, filesystem._write_item

    def counting_write_data(self, plan, planner):
        global saves, items
        saves, items = saves + 1, 0
        return write_data(self, plan, planner)

    def faulty_write_item(transforms, stream, *args, **kwargs):
        global items
        items += 1
        rank = int(os.environ.get("RANK", 0))
        if saves == SETTINGS["full_disk_at_save"] and rank == SETTINGS["full_disk_rank"] and items > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), getattr(stream, "name", "?"))
        if saves == SETTINGS["slow_save_at"]:
            time.sleep(SETTINGS["slow_save_s"])
        return write_item(transforms, stream, *args, **kwargs)

    filesystem._FileSystemWriter.write_data = counting_write_data
    filesystem._write_item = faulty_write_item
