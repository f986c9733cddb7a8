"""The collection of bundles: packaging, index, verification (``python -m bundles.package``)."""
