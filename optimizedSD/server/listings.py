"""The read-only endpoints' answers in the webui's shapes: ``/png-info``, ``/loras``, ``/embeddings``, ``/memory``,
and the page at ``/`` (``page.html`` next to this file: plain HTML and JavaScript, no build step)."""

from __future__ import annotations

import io
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from PIL import UnidentifiedImageError

from ldm.conditioning.embeddings import SUFFIXES as EMBEDDING_SUFFIXES
from ldm.conditioning.embeddings import EmbeddingError, load_embedding
from ldm.errors import UsageError
from ldm.host_memory import host_available_bytes
from ldm.loading.lora import LORA_SUFFIXES
from optimizedSD.infotext import parse_infotext, read_parameters
from optimizedSD.server.service import decode_image

PAGE = Path(__file__).with_name("page.html")


def png_info(image: str) -> dict[str, Any]:
    """``POST /sdapi/v1/png-info``: the image's infotext (``info``), its fields parsed (``parameters``, with
    ``Prompt``, ``Negative prompt`` and ``Size-1``/``Size-2`` as the webui's parser gives them), ``items``."""
    data = decode_image(image, "image")
    try:
        text = read_parameters(io.BytesIO(data)) or ""
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise UsageError(f"image: not an image Pillow reads ({type(error).__name__})") from None
    if not text:
        return {"info": "", "items": {}, "parameters": {}}
    parsed = parse_infotext(text)
    parameters: dict[str, Any] = {"Prompt": parsed.prompt, "Negative prompt": parsed.negative_prompt, **parsed.fields}
    width, _, height = parsed.fields.get("Size", "").partition("x")
    if width.isdigit() and height.isdigit():
        parameters["Size-1"], parameters["Size-2"] = width, height
    return {"info": text, "items": {"parameters": text}, "parameters": parameters}


def loras_listing(folder: Path) -> list[dict[str, Any]]:
    """``GET /sdapi/v1/loras``: the files ``<lora:NAME>`` can name (``--lora_dir``)."""
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in LORA_SUFFIXES and p.is_file())
    return [{"name": p.stem, "alias": p.stem, "path": str(p.resolve()), "metadata": {}} for p in files]


def embeddings_listing(folder: Path) -> dict[str, Any]:
    """``GET /sdapi/v1/embeddings``: the textual inversions under ``--embeddings_dir`` (``loaded``), and the files
    that do not read as one (``skipped``)."""
    loaded, skipped = {}, {}
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EMBEDDING_SUFFIXES and p.is_file()) \
        if folder.is_dir() else []
    for path in files:
        try:
            embedding = load_embedding(path)
        except EmbeddingError:
            skipped[path.stem] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                                  "vectors": 0}
            continue
        vectors, width = embedding.vectors.shape
        loaded[embedding.name] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": width,
                                  "vectors": vectors}
    return {"loaded": loaded, "skipped": skipped}


def process_rss() -> int:
    """This process's resident memory in bytes (``/proc/self/statm``)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def memory_listing() -> dict[str, Any]:
    """``GET /sdapi/v1/memory``: host RAM (``used`` is this process's resident memory) and CUDA's."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    ram = {"free": host_available_bytes() or 0, "used": process_rss(), "total": total}
    if not torch.cuda.is_available():
        return {"ram": ram, "cuda": {"error": "unavailable"}}
    free, card = torch.cuda.mem_get_info()
    stats = torch.cuda.memory_stats()
    cuda = {"system": {"free": free, "used": card - free, "total": card},
            "active": {"current": stats.get("active_bytes.all.current", 0), "peak": stats.get("active_bytes.all.peak", 0)},
            "allocated": {"current": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()},
            "reserved": {"current": torch.cuda.memory_reserved(), "peak": torch.cuda.max_memory_reserved()},
            "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)}}
    return {"ram": ram, "cuda": cuda}


@lru_cache(maxsize=1)
def page_html() -> str:
    return PAGE.read_text(encoding="utf-8")
