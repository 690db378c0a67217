"""A zoo of real architectures from well-known model libraries, for normfold's tests
and benchmarks: every architecture is built from its library's own code with random,
seeded weights from a tiny config (nothing is downloaded), and exported in the four
ways people export (`CONFIGS`).

    from tests.helpers.zoo import ARCHITECTURES, CONFIGS, cases, run_case
    result = run_case(ARCHITECTURES["llama"], CONFIGS["ts13"])

Libraries: transformers, diffusers, monai. (timm is not among them: it imports
torchvision, whose PyPI wheels do not import beside the CPU build of torch used here.)
"""

from __future__ import annotations

from .checks import CaseResult, run_case
from .registry import CONFIGS, Architecture, ExportConfig


def _architectures() -> dict[str, Architecture]:
    from . import diffusers_models, monai_models, transformers_models

    found = {}
    for module in (transformers_models, diffusers_models, monai_models):
        for arch in module.ARCHITECTURES:
            assert arch.name not in found, f"two zoo architectures named {arch.name}"
            found[arch.name] = arch
    return found


ARCHITECTURES = _architectures()


def cases() -> list[tuple[Architecture, ExportConfig]]:
    """Every (architecture, export configuration) pair."""
    return [(arch, config) for arch in ARCHITECTURES.values() for config in CONFIGS.values()]


__all__ = ["ARCHITECTURES", "CONFIGS", "Architecture", "CaseResult", "ExportConfig", "cases", "run_case"]
