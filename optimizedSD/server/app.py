"""The FastAPI app: the webui v1.10 endpoints under ``/sdapi/v1`` (same paths, request and response shapes) and
the page at ``/``. Bad requests get a 4xx JSON answer of one line, ``{"error": ..., "detail": ...}``, at once;
a bug is a 500 with one line (its traceback goes to the log) and the server keeps serving."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Body, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ldm.errors import UserError
from ldm.messages import one_line
from ldm.samplers import SAMPLERS
from ldm.samplers.schedules import SCHEDULES
from optimizedSD.server.guards import BodyLimit, basic_auth, validation_message
from optimizedSD.server.listings import embeddings_listing, loras_listing, memory_listing, page_html, png_info
from optimizedSD.server.schemas import Img2ImgRequest, PngInfoRequest, Txt2ImgRequest
from optimizedSD.server.service import MAX_IMAGE_BYTES, Service
from optimizedSD.server.worker import ShuttingDown

log = logging.getLogger(__name__)


def error_response(status: int, kind: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": kind, "detail": one_line(detail)}, status_code=status)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        status, message = validation_message(error)
        return error_response(status, "RequestValidationError", message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        response = error_response(error.status_code, "HTTPException", str(error.detail))
        response.headers.update(error.headers or {})
        return response

    @app.exception_handler(ShuttingDown)
    async def closing(request: Request, error: ShuttingDown) -> JSONResponse:
        return error_response(503, "ShuttingDown", "the server is shutting down")

    @app.exception_handler(UserError)
    async def user_error(request: Request, error: UserError) -> JSONResponse:
        return error_response(422, type(error).__name__, str(error))

    @app.exception_handler(Exception)
    async def bug(request: Request, error: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(500, type(error).__name__, str(error) or type(error).__name__)


def add_generation_routes(app: FastAPI, service: Service) -> None:
    @app.post("/sdapi/v1/txt2img")
    async def txt2img(body: Txt2ImgRequest) -> dict[str, Any]:
        return await service.generate(body, img2img=False)

    @app.post("/sdapi/v1/img2img")
    async def img2img(body: Img2ImgRequest) -> dict[str, Any]:
        return await service.generate(body, img2img=True)

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False) -> dict[str, Any]:
        return service.worker.progress.report(skip_current_image)

    @app.post("/sdapi/v1/interrupt")
    async def interrupt() -> dict[str, Any]:
        service.worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip() -> dict[str, Any]:
        service.worker.skip()
        return {}

    @app.post("/sdapi/v1/png-info")
    async def png_info_route(body: PngInfoRequest) -> dict[str, Any]:
        return png_info(body.image)


def add_listing_routes(app: FastAPI, service: Service) -> None:
    @app.get("/sdapi/v1/sd-models")
    async def sd_models() -> list[dict[str, Any]]:
        return service.sd_models()

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints() -> dict[str, Any]:
        service.checkpoints.refresh()
        return {}

    @app.get("/sdapi/v1/options")
    async def get_options() -> dict[str, Any]:
        return service.options

    @app.post("/sdapi/v1/options")
    async def set_options(values: dict[str, Any] = Body(...)) -> dict[str, Any]:
        await service.set_options(values)
        return {}

    @app.get("/sdapi/v1/samplers")
    async def samplers() -> list[dict[str, Any]]:
        return [{"name": s.label, "aliases": [s.name, *s.aliases], "options": dict(s.options)}
                for s in SAMPLERS.values()]

    @app.get("/sdapi/v1/schedulers")
    async def schedulers() -> list[dict[str, Any]]:
        return [{"name": s.name, "label": s.label, "aliases": list(s.aliases) or None, "default_rho": -1,
                 "need_inner_model": s.needs_model} for s in SCHEDULES.values()]

    @app.get("/sdapi/v1/loras")
    async def loras() -> list[dict[str, Any]]:
        return loras_listing(service.config.base.lora_dir)

    @app.get("/sdapi/v1/embeddings")
    async def embeddings() -> dict[str, Any]:
        return embeddings_listing(service.config.base.embeddings_dir)

    @app.get("/sdapi/v1/memory")
    async def memory() -> dict[str, Any]:
        return memory_listing()

    @app.get("/sdapi/v1/sd-vae")
    async def sd_vae() -> list[dict[str, Any]]:
        vae = service.config.base.vae
        return [] if vae is None else [{"model_name": vae.name, "filename": str(vae.resolve())}]

    @app.get("/sdapi/v1/scripts")
    async def scripts() -> dict[str, list[str]]:
        return {"txt2img": [], "img2img": []}  # no webui scripts or extensions run here

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return page_html()


def build_app(service: Service) -> FastAPI:
    """The app for ``service``; with users (``--api-auth``) every route asks for HTTP Basic credentials."""
    dependencies = [Depends(basic_auth(service.config.users))] if service.config.users else []
    app = FastAPI(title="optimizedSD", docs_url=None, redoc_url=None, openapi_url=None, dependencies=dependencies)
    add_error_handlers(app)
    add_generation_routes(app, service)
    add_listing_routes(app, service)
    app.add_middleware(BodyLimit, limit=MAX_IMAGE_BYTES)
    return app
