"""Parameter and FLOP counts of the networks: ``python -m common.networks.complexity msvmunet``.

FLOPs follow the convention of the papers (fvcore, as VMamba and MSVM-UNet report them): one
multiply-add counts as one FLOP. Convolutions, linear layers and matmuls are counted with
``torch.utils.flop_counter`` (which counts 2 per multiply-add, halved here); each selective scan
adds VMamba's ``flops_selective_scan_fn`` count, ``9 * B * L * D * N`` plus ``B * D * L`` for the
``D`` skip (the scan itself is replaced by a zero stub while counting, so its implementation's
internal matmuls are not counted twice). Modules with a ``fused`` switch (MSVM-UNet's ``MSConv``,
which runs its three depth-wise convolutions as one) are counted in their unfused form, as the
papers define and count them.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .blocks import ss2d as ss2d_module

__all__ = ["count_parameters", "count_flops", "NETWORKS"]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def _scan_flops_stub(total: list[int]):
    original = ss2d_module.selective_scan

    def stub(u, delta, A, B, C, D=None, z=None, *args, **kwargs):
        b, d, length = u.shape
        total[0] += 9 * b * length * d * A.shape[1] + (b * d * length if D is not None else 0)
        return torch.zeros_like(u)

    ss2d_module.selective_scan = stub
    try:
        yield
    finally:
        ss2d_module.selective_scan = original


@torch.no_grad()
def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """FLOPs of one forward pass at ``input_shape``.

    Returns ``dense_macs`` (multiply-adds of convolutions / linear layers / matmuls), ``scan``
    (VMamba's selective-scan count) and ``fvcore`` = ``dense_macs + scan`` (the convention of
    VMamba's tables); ``2 * dense_macs`` is what ``calflops`` / ``thop``-style counters that
    count a multiply-add as two FLOPs and cannot see the scan kernel report.
    """
    scan = [0]
    was_training = model.training
    model.eval()
    fused = [m for m in model.modules() if isinstance(getattr(m, "fused", None), bool) and m.fused]
    x = torch.zeros(input_shape)
    try:
        for m in fused:
            m.fused = False
        with _scan_flops_stub(scan), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for m in fused:
            m.fused = True
        model.train(was_training)
    dense = counter.get_total_flops() // 2
    return dict(dense_macs=dense, scan=scan[0], fvcore=dense + scan[0])


def _msvmunet(num_classes: int) -> nn.Module:
    from .msvmunet import msvmunet_tiny

    return msvmunet_tiny(in_channels=1, num_classes=num_classes)


def _mssmamba(num_classes: int) -> nn.Module:
    from .mssmamba import mssmamba

    return mssmamba(in_channels=1, num_classes=num_classes, img_size=224)


def _mambahunet(num_classes: int) -> nn.Module:
    from .mambahunet import mambahunet

    return mambahunet(in_channels=1, num_classes=num_classes)


NETWORKS: dict[str, tuple[Callable[[int], nn.Module], int, tuple[int, ...]]] = {
    # name: (builder(num_classes), default classes, input shape)
    "msvmunet": (_msvmunet, 4, (1, 1, 224, 224)),
    "mssmamba": (_mssmamba, 9, (1, 1, 224, 224)),
    "mambahunet": (_mambahunet, 2, (1, 1, 256, 256)),
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("network", choices=sorted(NETWORKS))
    ap.add_argument("--num-classes", type=int, default=None)
    args = ap.parse_args(argv)
    build, classes, shape = NETWORKS[args.network]
    classes = args.num_classes or classes
    model = build(classes)
    params, flops = count_parameters(model), count_flops(model, shape)
    print(f"{args.network} ({classes} classes), input {shape}: {params:,} parameters ({params / 1e6:.2f} M); "
          f"{flops['fvcore'] / 1e9:.2f} GFLOPs fvcore-style (multiply-adds + scan), "
          f"{2 * flops['dense_macs'] / 1e9:.2f} GFLOPs calflops-style (2 x multiply-adds, scan not seen)")


if __name__ == "__main__":
    main()
