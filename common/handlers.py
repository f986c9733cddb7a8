"""Ignite handlers the bundles attach from their configs."""

from __future__ import annotations

import logging

from ignite.engine import Engine, Events
from torch import nn

__all__ = ["FreezeEncoder"]

logger = logging.getLogger(__name__)


class FreezeEncoder:
    """Freeze a network's encoder for the first ``epochs`` epochs of training, then train it.

    The network must have ``freeze_encoder(frozen: bool)`` (``MSVMUNet`` has); a
    ``DistributedDataParallel`` wrapper is looked through. Frozen parameters get no gradient, so
    the optimizer leaves them unchanged.

    Args:
        network: the (possibly wrapped) network.
        epochs: number of epochs, counted from 1, during which the encoder is frozen; 0 disables.
    """

    def __init__(self, network: nn.Module, epochs: int) -> None:
        self.network = network
        self.epochs = int(epochs)
        self._frozen: bool | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        net = getattr(self.network, "module", self.network)
        frozen = engine.state.epoch <= self.epochs
        if frozen != self._frozen:
            net.freeze_encoder(frozen)
            self._frozen = frozen
            logger.info("epoch %d: encoder %s", engine.state.epoch, "frozen" if frozen else "trained")
