"""The optional ``openvino`` package: imported only when ``--backend openvino`` asks for it, with one line naming
the install command when it is missing, and the CPU settings every compile uses."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Callable

from ldm.backends.ir_cache import IRCache
from ldm.errors import UserError

INSTALL_HINT = 'pip install -e ".[openvino]"'
# fp32 kernels: OpenVINO's CPU plugin would otherwise pick bf16 on CPUs that have it (AVX-512 BF16, AMX), and
# with --quantize's int8 weights it would quantize the activations to int8 as well (dynamic quantization):
# either changes the image (int8 with it: 3 levels, 30 % of the values of a tiny-model image; without: 1 level).
CPU_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}


def import_openvino() -> ModuleType:
    """The ``openvino`` module, or a :class:`UserError` that says how to install it."""
    try:
        return importlib.import_module("openvino")
    except ImportError:
        raise UserError(f"--backend openvino needs the openvino package: {INSTALL_HINT}") from None


def openvino_version() -> str:
    return import_openvino().__version__


def read_or_convert(cache: IRCache, key: str, convert: Callable[[], object]) -> tuple[object, Path | None]:
    """The converted model ``key`` from ``cache`` and the ``model.bin`` it maps; else ``convert()``, stored and read
    back from the store, so that OpenVINO maps its weights from the file instead of holding the conversion's copy;
    when the cache cannot keep it, the conversion itself and None."""
    ov = import_openvino()
    model = cache.load(key, ov.Core().read_model)
    if model is not None:
        return model, cache.path(key) / "model.bin"
    converted = convert()
    stored = cache.store(key, lambda xml: ov.save_model(converted, xml, compress_to_fp16=False))
    if stored is None:
        return converted, None
    converted = None  # its copy of the weights goes before the stored file is read back
    return ov.Core().read_model(stored / "model.xml"), stored / "model.bin"
