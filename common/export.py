"""Export the bundles' networks to ONNX (and the helpers the TorchScript export needs).

The networks run the selective scan in a ``torch.autograd.Function`` (the ``cpu``, ``torch``,
``triton`` and ``mamba_ssm`` backends of :mod:`common.ops`). A trace records such a call as one
opaque Python node, which TorchScript cannot save ("Could not export Python function call
'SelectiveScanCPU'") and which the TorchScript-based ONNX exporter translates wrongly for the
``torch`` backend (outputs off by ~2e-3). The ``export`` backend (:mod:`common.ops.scan_export`) is
plain out-of-place tensor code with ``O(log L)`` operations per segment of the sequence, so a trace
of a network built with ``scan_backend="export"`` holds only standard operators and stays small:
that is what every export here uses. (The sequential ``ref`` scan traces too, but unrolls every
step: MSSMamba at 64 px took 148 s to export instead of 16 s, and onnxruntime ran it 10x slower.)
The trace fixes the exported graph to the traced height and width (the bundles resize every slice
to ``image_size`` before the network, so export at that size) and keeps the batch size free.

TorchScript goes through MONAI's own command (``python -m monai.bundle ckpt_export network_def
--scan_backend export --use_trace True ...``, see each bundle's ``docs/README.md``). ONNX::

    python -m common.export msvmunet_acdc --ckpt_file msvmunet_acdc/models/model.pt \\
        --filepath msvmunet_acdc/models/model.onnx

builds ``network_def`` from the bundle's ``configs/inference.json`` (extra ``--key value`` pairs
override config ids, e.g. ``--image_size 224``), loads the checkpoint, exports with the ``export``
scan and, unless ``--no-check``, runs the file with onnxruntime on a random batch of 2 and prints
the largest difference from the eager network.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "EXPORT_SCAN_BACKEND",
    "read_bundle_config",
    "build_network",
    "input_shape",
    "set_scan_backend",
    "scan_backend",
    "export_onnx",
    "run_onnx",
    "max_abs_diff",
    "main",
]

# the scan backend traced for export: standard operators only, O(log L) of them (see the module docstring)
EXPORT_SCAN_BACKEND = "export"


def read_bundle_config(bundle_root: str, overrides: Mapping[str, Any] | None = None,
                       config_file: str = "configs/inference.json"):
    """The bundle's config (``config_file`` relative to ``bundle_root``) with its metadata and ``overrides``.

    ``bundle_root`` is set to the given folder, as ``monai.bundle`` does with ``--bundle_root``.
    Returns a :class:`monai.bundle.ConfigParser`.
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(bundle_root, config_file))
    meta = os.path.join(bundle_root, "configs", "metadata.json")
    if os.path.isfile(meta):
        parser.read_meta(meta)
    parser["bundle_root"] = bundle_root
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser


def build_network(parser, ckpt_file: str | None = None, net_id: str = "network_def") -> nn.Module:
    """Instantiate ``net_id`` from ``parser`` on the CPU in eval mode, with the weights of ``ckpt_file``.

    The checkpoint may be a plain state dict (the bundles' ``models/model.pt``) or a
    ``CheckpointSaver`` dict holding it under ``"model"`` (``models/model_final.pt``); keys must match
    exactly.
    """
    net = parser.get_parsed_content(net_id, instantiate=True)
    if not isinstance(net, nn.Module):
        raise TypeError(f"config id {net_id!r} is a {type(net).__name__}, not a torch.nn.Module")
    if ckpt_file is not None:
        ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=True)
        state = ckpt["model"] if isinstance(ckpt.get("model"), Mapping) else ckpt
        net.load_state_dict(state)
    return net.cpu().eval()


def input_shape(parser, batch: int = 1) -> tuple[int, int, int, int]:
    """``(batch, in_channels, image_size, image_size)``: a network input of the bundle's config."""
    size = int(parser.get_parsed_content("image_size"))
    return batch, int(parser.get_parsed_content("in_channels")), size, size


def set_scan_backend(network: nn.Module, backend: str | None) -> dict[str, str | None]:
    """Set the selective-scan backend of every SS2D block of ``network``; returns the previous ones by module name."""
    from .networks.blocks import SS2D

    previous = {}
    for name, module in network.named_modules():
        if isinstance(module, SS2D):
            previous[name] = module.scan_backend
            module.scan_backend = backend
    return previous


@contextlib.contextmanager
def scan_backend(network: nn.Module, backend: str | None) -> Iterator[nn.Module]:
    """Run the ``with`` body with every SS2D block of ``network`` on ``backend``, then restore the previous ones."""
    previous = set_scan_backend(network, backend)
    try:
        yield network
    finally:
        modules = dict(network.named_modules())
        for name, old in previous.items():
            modules[name].scan_backend = old


def export_onnx(network: nn.Module, example: torch.Tensor, path: str, *, opset_version: int | None = None,
                input_name: str = "image", output_name: str = "pred", dynamic_batch: bool = True) -> str:
    """Export ``network`` to the ONNX file ``path`` by tracing it on ``example`` with the ``export`` scan.

    The network is traced in eval mode without gradients, with every SS2D block switched to the ``export``
    backend for the trace only (its own backends and training mode are restored afterwards), through
    PyTorch's TorchScript-based exporter (``dynamo=False``: the ``torch.export``-based one gives the
    same numbers but took 250 s instead of 25 s for MSVM-UNet at 32 x 32 on 2 CPU cores, and keeps the
    weights in a separate ``.data`` file). The graph has the spatial size of ``example``; with
    ``dynamic_batch`` its first axis is free. The file is written under a temporary name in the same
    folder and renamed when complete. Returns ``path``.
    """
    if example.dim() != 4:
        raise ValueError(f"export_onnx: example must be (batch, channels, H, W), got shape {tuple(example.shape)}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    axes = {input_name: {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None
    was_training = network.training
    network.eval()
    try:
        with scan_backend(network, EXPORT_SCAN_BACKEND), torch.no_grad(), warnings.catch_warnings():
            # shape checks in the forward passes become constants of the trace: expected, not an error
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # the TorchScript-based exporter is deprecated since PyTorch 2.9 and warns about itself: chosen here
            warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export",
                                    DeprecationWarning)
            warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
            torch.onnx.export(network, (example.detach().cpu(),), tmp, dynamo=False, input_names=[input_name],
                              output_names=[output_name], dynamic_axes=axes, opset_version=opset_version)
        os.replace(tmp, path)
    finally:
        network.train(was_training)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def run_onnx(path: str, inputs: torch.Tensor | np.ndarray) -> np.ndarray:
    """Run the single-input ONNX model ``path`` with onnxruntime on the CPU; returns its first output."""
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError("running an ONNX model needs onnxruntime: pip install onnxruntime") from err
    array = inputs.detach().cpu().numpy() if isinstance(inputs, torch.Tensor) else np.asarray(inputs)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: array.astype(np.float32)})[0]


def max_abs_diff(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """``max |a - b|`` of two arrays of the same shape (a shape mismatch raises ``ValueError``)."""
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.size else 0.0


def _parse_overrides(extra: Sequence[str]) -> dict[str, Any]:
    if len(extra) % 2 or not all(k.startswith("--") for k in extra[::2]):
        raise ValueError(f"config overrides come in --key value pairs, got {list(extra)}")
    overrides = {}
    for key, value in zip(extra[::2], extra[1::2]):
        try:
            overrides[key[2:]] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key[2:]] = value
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m common.export BUNDLE_DIR [--filepath F] [--ckpt_file C] [--no-check] [--key value ...]``."""
    ap = argparse.ArgumentParser(prog="python -m common.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle_root", help="the bundle folder (holding configs/inference.json)")
    ap.add_argument("--filepath", help="ONNX file to write (default: BUNDLE_DIR/models/model.onnx)")
    ap.add_argument("--ckpt_file", help="weights to load (default: BUNDLE_DIR/models/model.pt)")
    ap.add_argument("--config_file", default="configs/inference.json", help="relative to BUNDLE_DIR")
    ap.add_argument("--opset_version", type=int, default=None)
    ap.add_argument("--no-check", dest="check", action="store_false",
                    help="skip running the file with onnxruntime against the eager network")
    args, extra = ap.parse_known_args(argv)
    try:
        overrides = _parse_overrides(extra)
    except ValueError as err:
        ap.error(str(err))
    root = args.bundle_root
    filepath = args.filepath or os.path.join(root, "models", "model.onnx")
    ckpt_file = args.ckpt_file or os.path.join(root, "models", "model.pt")
    if not os.path.isfile(ckpt_file):
        ap.error(f"checkpoint {ckpt_file} not found (train the bundle first, or pass --ckpt_file)")
    parser = read_bundle_config(root, overrides, args.config_file)
    network = build_network(parser, ckpt_file)
    shape = input_shape(parser)
    export_onnx(network, torch.randn(shape), filepath, opset_version=args.opset_version)
    print(f"exported {ckpt_file} to {filepath} (input {shape[1:]} per item, batch free, scan backend "
          f"{EXPORT_SCAN_BACKEND!r} traced)")
    if args.check:
        x = torch.randn(2, *shape[1:], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = network(x)
        diff = max_abs_diff(run_onnx(filepath, x), expected)
        print(f"onnxruntime vs eager PyTorch on a batch of 2: max |diff| = {diff:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
