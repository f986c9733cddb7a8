"""Shared code of the Mamba segmentation bundles: the selective scan, SS2D/VSS blocks, networks.

Importing this package never imports mamba_ssm, causal_conv1d or triton: GPU backends are loaded
only when a CUDA tensor asks for them.
"""

__version__ = "0.1.0"
