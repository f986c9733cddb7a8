"""Model-zoo readiness of the three bundles: files, the config ids MONAI's bundle workflows and MONAI Label
use, TorchScript export through MONAI's ``ckpt_export`` and ONNX export (``common.export``), each export
checked against the eager network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings

import bundle_checks
import pytest
import torch
from monai.bundle import ConfigWorkflow, ckpt_export
from monai.inferers import Inferer
from monai.transforms import Compose
from monai.utils import BundleProperty, BundlePropertyConfig

from common import export
from common.bundle_run import REPO

BUNDLES = ["msvmunet_acdc", "mssmamba_synapse", "mambahunet_ms"]
# smallest inputs the networks take (MSVM-UNet and Mamba-HUNet: multiples of 32; MSSMamba: its multi-scale
# attention blocks pool the 1/16 tokens by 4, so 64)
EXPORT_SIZE = {"msvmunet_acdc": 32, "mssmamba_synapse": 64, "mambahunet_ms": 32}
ATOL = 1e-5
REQUIRED_FILES = ["configs/metadata.json", "configs/inference.json", "configs/train.json", "configs/evaluate.json",
                  "configs/multi_gpu_train.json", "configs/logging.conf", "docs/README.md", "docs/data_license.txt"]
# ids read by MONAI Label's BundleInferTask / BundleTrainTask (monailabel/tasks/{infer,train}/bundle.py) and by
# model-zoo tooling (ckpt_export: network_def; the CheckpointLoader's path: checkpoint)
INFER_IDS = ["bundle_root", "device", "dataset_dir", "checkpoint", "network_def", "network", "preprocessing",
             "postprocessing", "inferer", "dataset", "evaluator", "image_size", "in_channels", "scan_backend"]
TRAIN_IDS = ["bundle_root", "device", "dataset_dir", "network_def", "network", "train#trainer",
             "train#trainer#max_epochs", "train#dataset", "train#dataset#data", "train#inferer", "train#handlers",
             "train#key_metric", "validate#evaluator", "validate#dataset#data", "validate#key_metric", "val_interval"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def trained(module_tmp):
    """Per bundle: (network at the export size with the bundle's automatic scan, its weights saved as a plain
    state dict like the bundles' models/model.pt). Fresh random weights stand in for trained ones."""
    cache = {}

    def get(name):
        if name not in cache:
            parser = export.read_bundle_config(os.path.join(REPO, name), {"image_size": EXPORT_SIZE[name]})
            torch.manual_seed(0)
            net = export.build_network(parser)
            ckpt = str(module_tmp(name) / "model.pt")
            torch.save(net.state_dict(), ckpt)
            cache[name] = net, ckpt
        return cache[name]

    return get


def _sample(name: str, batch: int = 2) -> torch.Tensor:
    size = EXPORT_SIZE[name]
    return torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- files and config ids


@pytest.mark.parametrize("name", BUNDLES)
def test_required_files_and_ids(name):
    root = os.path.join(REPO, name)
    missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(root, f))]
    assert not missing, f"{name} lacks {missing}"
    assert os.path.isdir(os.path.join(root, "models"))
    assert os.path.getsize(os.path.join(root, "docs", "data_license.txt")) > 0
    infer = export.read_bundle_config(root)
    assert [i for i in INFER_IDS if i not in infer] == []
    train = export.read_bundle_config(root, config_file="configs/train.json")
    assert [i for i in TRAIN_IDS if i not in train] == []
    # MONAI Label inserts a CheckpointLoader by looking at every train handler's "_target_"
    assert all(isinstance(h, dict) and "_target_" in h for h in train["train#handlers"])
    # multi-GPU training is train.json + multi_gpu_train.json: the training ids still resolve to the same places
    multi = ConfigWorkflow([os.path.join(root, "configs", c) for c in ("train.json", "multi_gpu_train.json")],
                           logging_file=False, workflow_type="train", bundle_root=root)
    required = [p[BundlePropertyConfig.ID] for p in multi.properties.values() if p.get(BundleProperty.REQUIRED)]
    assert [i for i in required if i not in multi.parser] == []
    assert multi.parser["train#trainer#key_train_metric"] == "@train#key_metric"


@pytest.mark.parametrize("workflow_type, config", [("infer", "inference.json"), ("train", "train.json")])
@pytest.mark.parametrize("name", BUNDLES)
def test_monai_workflow_properties(name, workflow_type, config, tmp_path):
    """MONAI's own check of a bundle workflow (monai.bundle.properties: every required property exists and the
    optional ones are referenced under their standard ids), after ``initialize`` on a copy of the bundle: the
    sample data is generated there and every required component (trainer, evaluator, datasets) is built on
    the CPU, nothing is run."""
    root = bundle_checks.fresh_bundle(name, tmp_path)
    overrides = {"image_size": EXPORT_SIZE[name], "device": "$torch.device('cpu')", "num_workers": 0}
    if workflow_type == "train":
        overrides["cache_rate"] = 0.0
    workflow = ConfigWorkflow(os.path.join(root, "configs", config), logging_file=False,
                              workflow_type=workflow_type, bundle_root=root, **overrides)
    workflow.initialize()
    assert workflow.check_properties() == []
    assert isinstance(workflow.network_def, torch.nn.Module)
    if workflow_type == "infer":
        assert len(workflow.dataset) > 0  # the sample volumes under dataset_dir
        # what MONAI Label builds from the inference config
        for key in ("preprocessing", "postprocessing"):
            assert isinstance(workflow.parser.get_parsed_content(key), Compose)
        assert isinstance(workflow.inferer, Inferer)
    else:
        assert workflow.max_epochs == workflow.parser.get_parsed_content("train#trainer#max_epochs") > 0
        assert len(workflow.train_dataset) > 0
        if "early_stop" in workflow.parser:  # `run` sets the trainer of the EarlyStopHandler among the train handlers
            assert workflow.parser.get_parsed_content("early_stop") in workflow.train_handlers
            # ... also when MONAI Label puts a CheckpointLoader in front of them
            loader = {"_target_": "CheckpointLoader", "load_path": "model.pt", "load_dict": {"model": "@network"}}
            workflow.parser["train#handlers"] = [loader, *workflow.parser["train#handlers"]]
            early = workflow.parser.get_parsed_content("early_stop")
            assert type(early).__name__ == "EarlyStopHandler" and early in workflow.train_handlers


# ---------------------------------------------------------------- TorchScript


@pytest.mark.parametrize("name", BUNDLES)
def test_torchscript_export_through_monai_cli(name, trained, tmp_path, monkeypatch):
    """``monai.bundle ckpt_export`` traced with the ``export`` scan; the saved module (reloaded, with the bundle's
    metadata and inference config inside) equals the eager network on a batch of 2 (traced with 1).

    Mamba-HUNet's export runs the documented command line; the other two call the function it runs
    (``monai.bundle.ckpt_export``) in this process with the same arguments, which saves ~12 s of MONAI
    import each."""
    net, ckpt = trained(name)
    size, ts_file = EXPORT_SIZE[name], str(tmp_path / "model.ts")
    args = {"filepath": ts_file, "ckpt_file": ckpt, "meta_file": "configs/metadata.json",
            "config_file": "configs/inference.json", "bundle_root": os.path.join(REPO, name), "image_size": size,
            "scan_backend": "export", "use_trace": True, "input_shape": [1, 1, size, size],
            "converter_kwargs": {"check_trace": False}}
    start = time.perf_counter()
    if name == "mambahunet_ms":  # the same arguments as the CLI takes them (fire parses Python literals)
        cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def"]
        for key, value in args.items():
            cmd += [f"--{key}", str(value)]
        res = subprocess.run(cmd, cwd=os.path.join(REPO, name), env=_env(), capture_output=True, text=True)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    else:
        monkeypatch.chdir(os.path.join(REPO, name))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            ckpt_export("network_def", **args)
    exported = time.perf_counter() - start
    extra = {"metadata.json": "", "inference.json": ""}
    ts = torch.jit.load(ts_file, map_location="cpu", _extra_files=extra)
    with open(os.path.join(REPO, name, "configs", "metadata.json")) as f:
        meta = json.load(f)
    saved = json.loads(extra["metadata.json"])
    assert saved["version"] == meta["version"] and saved["network_data_format"] == meta["network_data_format"]
    with open(os.path.join(REPO, name, "configs", "inference.json")) as f:
        assert json.loads(extra["inference.json"]) == json.load(f)
    x = _sample(name)
    with torch.no_grad():
        expected = net(x)
        start = time.perf_counter()
        with torch.jit.optimized_execution(False):  # the first optimising run of a graph this long costs more
            got = ts(x)
    diff = export.max_abs_diff(got, expected)
    print(f"{name} TorchScript ({size} px): export {exported:.1f} s, run {time.perf_counter() - start:.1f} s, "
          f"max |diff| {diff:.3g}")
    assert got.shape == expected.shape and got.shape[2:] == (size, size)
    assert diff <= ATOL


@pytest.mark.parametrize("name", BUNDLES)
def test_torchscript_errors_without_the_export_scan(name, trained, tmp_path):
    """What a user gets from ``ckpt_export`` without ``--use_trace True --scan_backend export``: scripting fails in the
    TorchScript compiler, and a trace with the automatic scan (an autograd.Function) cannot be saved."""
    net, _ = trained(name)
    # a RuntimeError from the scan, or (MSVM-UNet's LayerNorm2d reaches the norm-kernel dispatch first) the
    # compiler's NotSupportedError
    with pytest.raises((RuntimeError, torch.jit.frontend.FrontendError)):
        torch.jit.script(net)
    assert {b.scan_backend for b in net.modules() if hasattr(b, "scan_backend")} == {None}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the forward's shape checks become constants
        traced = torch.jit.trace(net, _sample(name, 1), check_trace=False)
    with pytest.raises(RuntimeError, match=r"Could not export Python function call 'SelectiveScan\w+'"):
        torch.jit.save(traced, str(tmp_path / "model.ts"))


# ---------------------------------------------------------------- ONNX


@pytest.mark.parametrize("name", BUNDLES)
def test_onnx_export_matches_eager(name, trained, tmp_path):
    """``python -m common.export`` (its ``main``, in process) writes an ONNX file that onnxruntime runs with the
    eager network's numbers on a batch of 2 (exported with 1); the network keeps its own scan backend."""
    pytest.importorskip("onnx", reason="ONNX export needs the onnx package (pip install onnx)")
    pytest.importorskip("onnxruntime", reason="checking the ONNX file needs onnxruntime (pip install onnxruntime)")
    import onnx

    net, ckpt = trained(name)
    size, out = EXPORT_SIZE[name], tmp_path / "export" / "model.onnx"
    start = time.perf_counter()
    assert export.main([os.path.join(REPO, name), "--filepath", str(out), "--ckpt_file", ckpt,
                        "--image_size", str(size), "--no-check"]) == 0
    exported = time.perf_counter() - start
    assert sorted(os.listdir(out.parent)) == ["model.onnx"]  # no temporary file left behind
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    (inp,), (outp,) = model.graph.input, model.graph.output
    assert (inp.name, outp.name) == ("image", "pred")
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", 1, size, size]
    x = _sample(name)
    with torch.no_grad():
        expected = net(x)
    got = export.run_onnx(str(out), x)
    diff = export.max_abs_diff(got, expected)
    print(f"{name} ONNX ({size} px): export {exported:.1f} s, max |diff| {diff:.3g}")
    assert diff <= ATOL


def test_onnx_export_restores_the_network_and_rejects_bad_input(tmp_path):
    from common.networks.mambahunet import MambaHUNet

    net = MambaHUNet(1, 2, embed_dim=16, depths=(1, 1), scan_backend="torch").train()
    with pytest.raises(ValueError, match=r"\(batch, channels, H, W\)"):
        export.export_onnx(net, torch.randn(1, 32, 32), str(tmp_path / "m.onnx"))
    pytest.importorskip("onnx", reason="ONNX export needs the onnx package (pip install onnx)")
    export.export_onnx(net, torch.randn(1, 1, 32, 32), str(tmp_path / "m.onnx"), dynamic_batch=False)
    assert net.training and {m.scan_backend for m in net.modules() if hasattr(m, "scan_backend")} == {"torch"}
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_export_cli_checks_with_onnxruntime(tmp_path, capsys):
    """The documented command end to end on Mamba-HUNet (the quickest network here), with its own check."""
    pytest.importorskip("onnx", reason="ONNX export needs the onnx package (pip install onnx)")
    pytest.importorskip("onnxruntime", reason="checking the ONNX file needs onnxruntime (pip install onnxruntime)")
    root = os.path.join(REPO, "mambahunet_ms")
    parser = export.read_bundle_config(root, {"image_size": 32})
    ckpt = str(tmp_path / "model.pt")
    torch.save({"model": export.build_network(parser).state_dict()}, ckpt)  # a CheckpointSaver-style dict
    assert export.main([root, "--filepath", str(tmp_path / "model.onnx"), "--ckpt_file", ckpt,
                        "--image_size", "32"]) == 0
    report = capsys.readouterr().out
    diff = float(report.split("max |diff| = ")[1].split()[0])
    assert diff <= ATOL
    with pytest.raises(SystemExit):
        export.main([root, "--ckpt_file", str(tmp_path / "missing.pt")])
    with pytest.raises(SystemExit):
        export.main([root, "--ckpt_file", ckpt, "--image_size"])
