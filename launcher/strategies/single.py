"""One process, one device: the base behaviour as it is."""
from ..errors import ConfigError
from .base import Strategy


class SingleStrategy(Strategy):
    name = "single"

    @classmethod
    def check(cls, cfg, sizes, world_size: int, local_world_size: int | None) -> None:
        super().check(cfg, sizes, world_size, local_world_size)
        if world_size > 1:
            raise ConfigError(f"strategy=single cannot run on {world_size} processes: use ddp, fsdp or deepspeed "
                              "(or auto)")
