"""What the endpoints do, apart from HTTP: a generation request becomes the scripts' run on the kept model, its
images come back as base64 PNGs carrying their ``parameters``; options, checkpoints, LoRAs and embeddings are
listed as the webui lists them.

Images are written by the scripts' own writer (:class:`optimizedSD.outputs.SampleWriter`: whole files under
final names, the infotext in a PNG ``parameters`` chunk), into a temporary folder that is removed after the
answer, or into ``--outdir`` with ``save_images``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool

from ldm.errors import UsageError
from ldm.pipeline.request import GenerationRequest
from optimizedSD.arguments import parse_args
from optimizedSD.generation import check_inputs
from optimizedSD.infotext import read_parameters
from optimizedSD.run_outputs import RunSummary, weights_hash
from optimizedSD.server.checkpoints import CheckpointList
from optimizedSD.server.flags import ServerConfig
from optimizedSD.server.schemas import GenerationFields, Img2ImgRequest, ignored_fields
from optimizedSD.server.translate import Resolved, api_message, generation_argv, info_json, resolve
from optimizedSD.server.worker import Worker

log = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 50 * 2**20
DEFAULT_OPTIONS: dict[str, Any] = {
    "CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0, "randn_source": "GPU", "eta_ancestral": 1.0,
    "eta_ddim": 0.0, "return_grid": True, "samples_format": "png", "sd_vae": "Automatic",
}
HONOURED_OPTIONS = {"sd_model_checkpoint", *DEFAULT_OPTIONS} - {"samples_format", "sd_vae"}
_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=-]+)*;base64,")


def decode_image(text: str, field: str) -> bytes:
    """A base64 image or ``data:`` URL's bytes; anything else is a one-line :class:`UsageError`."""
    body = _DATA_URL.sub("", text.strip(), count=1)
    try:
        data = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"{field} is not base64 (or a data:image/...;base64, URL)") from None
    if not data:
        raise UsageError(f"{field} is empty")
    return data


def encode_file(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


class Service:
    """The server's state: its command line, the offered checkpoints, the options, the worker."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.checkpoints = CheckpointList(config.ckpt, config.ckpt_dir)
        self.options: dict[str, Any] = {**DEFAULT_OPTIONS, "sd_model_checkpoint": self.checkpoints.first().title}
        self.worker = Worker()

    # ---- generation -------------------------------------------------------------------------------------
    def request_for(self, body: GenerationFields, resolved: Resolved, folder: Path) -> GenerationRequest:
        """The scripts' request for ``body``: its images written under ``folder``, checked as the scripts check."""
        options = {**self.options, **(body.override_settings or {})}
        ckpt = self.checkpoints.find(str(options["sd_model_checkpoint"])).path
        init = mask = None
        if isinstance(body, Img2ImgRequest):
            if len(body.init_images) > 1:
                log.warning("img2img: %d init images sent, the first is used", len(body.init_images))
            init = folder / "init_image"
            init.write_bytes(decode_image(body.init_images[0], "init_images[0]"))
            if body.mask:
                mask = folder / "mask"
                mask.write_bytes(decode_image(body.mask, "mask"))
        save = body.save_images or self.config.save_images
        outdir = self.config.outdir if save else folder / "images"
        argv = [*self.config.model_argv, "--ckpt", str(ckpt),
                *generation_argv(body, resolved, options, str(self.config.base.device), outdir, init, mask)]
        try:
            return parse_args(argv, resolved.mode)
        except UsageError as error:
            raise UsageError(api_message(str(error))) from None

    async def generate(self, body: GenerationFields, img2img: bool) -> dict[str, Any]:
        """``POST /sdapi/v1/txt2img`` and ``/img2img``: the images, the request, and the info as JSON text."""
        asked = ignored_fields(body)
        if asked:
            log.warning("not done by this server, ignored: %s", ", ".join(asked))
        resolved = resolve(body, img2img)
        with tempfile.TemporaryDirectory(prefix="optimizedsd-server-") as tmp:
            request = self.request_for(body, resolved, Path(tmp))
            try:  # bad images, a bad prompt, sizes: answered now, not after the queue
                await run_in_threadpool(check_inputs, request)
            except UsageError as error:
                raise UsageError(api_message(str(error))) from None
            summary: RunSummary = await self.worker.run(self.worker.generate, request, resolved.mode)
            files = ([summary.grid] if summary.grid is not None and len(summary.written) > 1 else []) + summary.written
            images = [encode_file(path) for path in files] if body.send_images else []
            infotexts = [read_parameters(path) or "" for path in summary.written]
        ckpt_hash = await run_in_threadpool(weights_hash, request.ckpt)
        options = {**self.options, **(body.override_settings or {})}
        info = info_json(body, resolved, infotexts, request.ckpt.stem, ckpt_hash, options)
        if isinstance(body, Img2ImgRequest) and body.include_init_images and body.send_images:
            images.append(_DATA_URL.sub("", body.init_images[0].strip(), count=1))
        parameters = body.model_dump()
        if isinstance(body, Img2ImgRequest):  # as the webui: the request without its images
            parameters.update(init_images=None, mask=None)
        return {"images": images, "parameters": parameters, "info": json.dumps(info)}

    # ---- options and checkpoints ----------------------------------------------------------------------------
    async def set_options(self, values: dict[str, Any]) -> None:
        """``POST /sdapi/v1/options``: ``sd_model_checkpoint`` loads that checkpoint (in the queue's order)."""
        unknown = sorted(set(values) - HONOURED_OPTIONS)
        if unknown:
            log.warning("options kept but not acted on: %s", ", ".join(unknown))
        if "randn_source" in values and values["randn_source"] not in ("GPU", "CPU", "NV"):
            raise UsageError(f"randn_source {values['randn_source']!r} is not one of: GPU, CPU, NV")
        name = values.get("sd_model_checkpoint")
        if name is not None:
            checkpoint = self.checkpoints.find(str(name))
            with tempfile.TemporaryDirectory(prefix="optimizedsd-server-") as tmp:
                argv = [*self.config.model_argv, "--ckpt", str(checkpoint.path), "--outdir", tmp, "--skip_grid",
                        "--n_samples", "1"]
                request = parse_args(argv, "txt2img")
                await self.worker.run(self.worker.switch, request)
            values = {**values, "sd_model_checkpoint": checkpoint.title}
        self.options.update(values)

    def sd_models(self) -> list[dict[str, Any]]:
        current = self.options["sd_model_checkpoint"]
        return [item.entry(hashed=item.title == current) for item in self.checkpoints.items]
