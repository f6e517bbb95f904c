"""Engines other than PyTorch's eager one for the models of a run (``--backend``).

``openvino``: the UNet converted once with ``openvino.convert_model`` (Intel's OpenVINO, the CPU path of FastSD CPU
and of Hugging Face's optimum-intel), kept on disk (:mod:`ldm.backends.ir_cache`) and compiled for the CPU in
fp32 (:mod:`ldm.backends.openvino_unet`). It computes the numbers of the PyTorch UNet within fp32 rounding.
"""

BACKENDS = ("torch", "openvino")
