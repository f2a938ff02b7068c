"""Speed and cost, ours next to Hugging Face's, each suite a module (`scripts/benchmark.py --only
NAME`): training, generation, decoding and data loading by default; fusion, variants, precision,
features and imports when asked. Every figure is a median of runs taken in turns
(`timing.median_seconds`), for randomly initialised models of a `conf/model/` preset."""

from captioner.tools.benchmark import (
    decoding,
    features,
    fusion,
    generation,
    imports,
    loading,
    precision,
    training,
    variants,
)
from captioner.tools.benchmark.suite import Setting, Suite

SUITES: dict[str, Suite] = {
    module.SUITE.name: module.SUITE
    for module in (
        training, generation, decoding, loading, fusion, variants, precision, features, imports
    )
}  # fmt: skip

__all__ = ["SUITES", "Setting", "Suite"]
