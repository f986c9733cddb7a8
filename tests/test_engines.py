"""CUDA-graph training iteration: MONAI's eager iteration off the GPU, the same training on it."""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.losses import DiceCELoss

from common.engines import CapturePolicy, CUDAGraphTrainIteration, graphed_train_iteration
from common.networks.mambahunet import MambaHUNet

CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parents[1]


def test_capture_policy_captures_a_repeated_key_and_runs_odd_ones_eagerly():
    policy = CapturePolicy(warmup=2)
    full, odd, frozen = "full", "odd", "frozen"
    seen = []
    for key in [full, full, full, odd, full, full, odd, frozen, frozen, frozen, full]:
        action = policy.decide(key)
        if action == CapturePolicy.CAPTURE:
            policy.captured_as(key)
        seen.append(action)
    assert seen == ["warmup", "warmup", "capture", "eager", "replay", "replay", "eager",
                    "eager", "warmup", "capture", "eager"]
    with pytest.raises(ValueError, match="warmup"):
        CapturePolicy(warmup=0)
    assert graphed_train_iteration(False) is None
    assert isinstance(graphed_train_iteration(True, warmup=3), CUDAGraphTrainIteration)


def small_net() -> MambaHUNet:
    torch.manual_seed(0)
    return MambaHUNet(1, 2, embed_dim=16, depths=(1, 1), drop_path_rate=0.0, dropout=0.0)


def batches(sizes, device, size=32):
    gen = torch.Generator().manual_seed(1)
    out = []
    for b in sizes:
        image = torch.randn(b, 1, size, size, generator=gen)
        label = (image > 0.3).float()  # learnable: the label follows the image
        out.append({"image": image.to(device), "label": label.to(device)})
    return out


def train(device, iteration_update, amp=False, epochs=3, sizes=(4, 4, 4, 3), freeze_at_epoch=3, loss=None):
    """Losses and final weights of a short SupervisedTrainer run; the first half of the parameters
    stops training at ``freeze_at_epoch`` (as FreezeEncoder's unfreezing changes which parameters train)."""
    net = small_net().to(device)
    # SGD, not Adam: the scan's backward adds with atomics (not bitwise reproducible), and Adam's
    # normalised steps turn those last-bit differences in near-zero gradients into unit-sized ones
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    trainer = SupervisedTrainer(
        device=torch.device(device), max_epochs=epochs, train_data_loader=batches(sizes, device), network=net,
        optimizer=opt, loss_function=loss or DiceCELoss(to_onehot_y=True, softmax=True), amp=amp,
        amp_kwargs={"dtype": torch.bfloat16} if amp else None, iteration_update=iteration_update)
    params = list(net.parameters())
    losses = []

    @trainer.on(Events.EPOCH_STARTED)
    def _freeze(engine):
        for p in params[: len(params) // 2]:
            p.requires_grad_(engine.state.epoch < freeze_at_epoch)

    @trainer.on(IterationEvents.LOSS_COMPLETED)
    def _guard(engine):  # synchronises, as the bundles' non-finite-loss guard: outside the graph, so allowed
        assert math.isfinite(float(engine.state.output["loss"].detach()))

    @trainer.on(Events.ITERATION_COMPLETED)
    def _record(engine):
        out = engine.state.output
        losses.append(float((out[0] if isinstance(out, list) else out)["loss"]))

    trainer.run()
    return torch.tensor(losses), {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


def test_off_cuda_the_graphed_iteration_is_monai_s_own(caplog):
    ref_losses, ref_state = train("cpu", None, epochs=2)
    it = CUDAGraphTrainIteration()
    with caplog.at_level(logging.INFO, logger="common.engines"):
        losses, state = train("cpu", it, epochs=2)
    torch.testing.assert_close(losses, ref_losses, rtol=0, atol=0)
    for k in ref_state:
        torch.testing.assert_close(state[k], ref_state[k], rtol=0, atol=0)
    assert it.counts == {"replay": 0, "capture": 0, "eager": 8}
    assert sum("device is not CUDA" in r.message for r in caplog.records) == 1  # said once


def test_training_configs_pass_the_iteration_to_the_trainer():
    from monai.bundle import ConfigParser

    for bundle in ("msvmunet_acdc", "mssmamba_synapse", "mambahunet_ms"):
        cfg = json.loads((ROOT / bundle / "configs" / "train.json").read_text())
        assert cfg["cuda_graphs"] is True  # on by default: eager off CUDA and under DDP
        parser = ConfigParser(copy.deepcopy(cfg))
        assert isinstance(parser.get_parsed_content("train#trainer#iteration_update"), CUDAGraphTrainIteration)
        parser = ConfigParser(copy.deepcopy(cfg))
        parser["cuda_graphs"] = False  # --cuda_graphs false: MONAI's own iteration
        assert parser.get_parsed_content("train#trainer#iteration_update") is None
        # the optimizer's fused step on CUDA only (CPU runs keep PyTorch's default; an explicit
        # fused=False would also turn off the foreach step on CUDA)
        # (MONAI Label's trainer passes the device as a plain string)
        for device, fused in [("$torch.device('cpu')", None), ("cpu", None), ("$torch.device('cuda:0')", True),
                              ("cuda:0", True)]:
            parser = ConfigParser(copy.deepcopy(cfg))
            parser["device"] = device
            assert parser.get_parsed_content("optimizer#fused") is fused, (bundle, device)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("amp", [False, True])
def test_cuda_graph_training_matches_eager_training(amp):
    ref_losses, ref_state = train("cuda", None, amp=amp)
    it = CUDAGraphTrainIteration(warmup=2)
    losses, state = train("cuda", it, amp=amp)
    # epoch 1: warm-up, warm-up, capture, odd batch; epoch 2: 3 replays, odd; epoch 3 (fewer
    # parameters train): the graph is dropped, warm-up x2, capture, odd
    assert it.counts == {"replay": 5, "capture": 2, "eager": 7}
    tol = {"rtol": 2e-2, "atol": 2e-3} if amp else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(losses, ref_losses, **tol)
    for k in ref_state:
        torch.testing.assert_close(state[k], ref_state[k], **tol)
    init = small_net().state_dict()
    assert any(not torch.equal(state[k], init[k]) for k in init if init[k].is_floating_point())  # it trained


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("sync, message", [
    ("item", "synchronises with the CPU"),  # seen by the sync debug mode: no capture is tried
    ("synchronize", "capturing the training step failed"),  # not seen: the capture fails and is undone
])
def test_a_step_that_cannot_be_captured_trains_eagerly(caplog, sync, message):
    dice = DiceCELoss(to_onehot_y=True, softmax=True)

    def syncing_loss(pred, target):  # neither is allowed while capturing
        value = dice(pred, target)
        if sync == "item":
            return value * (1.0 if value.item() >= 0 else 0.0)
        torch.cuda.synchronize()
        return value

    ref_losses, ref_state = train("cuda", None, epochs=2, loss=syncing_loss)
    it = CUDAGraphTrainIteration(warmup=1)
    with caplog.at_level(logging.WARNING, logger="common.engines"):
        losses, state = train("cuda", it, epochs=2, loss=syncing_loss)
    assert it.counts["replay"] == 0 and it.counts["capture"] == 0
    assert any(message in r.message for r in caplog.records)
    # the stream and CUDA's random generator are usable as before
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    assert torch.randn(8, device="cuda").isfinite().all()
    torch.testing.assert_close(losses, ref_losses, rtol=1e-4, atol=1e-5)
    for k in ref_state:
        torch.testing.assert_close(state[k], ref_state[k], rtol=1e-4, atol=1e-5)
