"""The old FastAPI backend's REST API, served beside the Gradio app (same process, same port).

Paths, methods, JSON bodies, answers and status codes are those the old backend's README documented
(issue #13), so a script or front end written for it works unchanged; fields may be added, none are
removed or renamed. Every call goes through Studio and Access, exactly like the Gradio endpoints:
the same owners, keys, limits, engine and S3 behaviour; another owner's image answers like an unknown
id. Two of the old meanings differ from the Gradio API and are kept here on purpose: a render draws
on a transparent canvas by default, and `"color": null` shows the photo's own pixels (a cut-out).

Errors are `{"detail": "<a sentence>"}` with the status chosen in one place (`status_for`):
400 a request the caller can fix, 401 a missing or unknown key, 404 an unknown image or mask,
422 a body or query of the wrong shape, 500 our storage or an unexpected error, 502 the segmenter.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import fastapi
from fastapi import APIRouter, Body, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Send
from starlette.types import Scope as ASGIScope

import imaging
from access import Access, Scope
from errors import (
    Conflict,
    InvalidInput,
    LimitExceeded,
    MaskStudioError,
    NotFound,
    SegmentationError,
    Unauthorized,
)
from settings import Settings
from studio import Studio

log = logging.getLogger("mask_studio")

GENERIC_ERROR = "Something unexpected went wrong; it has been logged. Please try again."
RENDERED = "Image rendered successfully"
LEGACY_PATHS = ("/generate_and_store_masks", "/render_masks/", "/images", "/docs", "/openapi.json")
HEAVY_CONCURRENCY = 2  # segmentations at once through this API, as for the Gradio endpoints
# base64 makes a body 4/3 of the file; a little room for the JSON around it.
BASE64_SLACK = 64 * 1024


# ---- settings read from the environment (pure; app.py passes the raw values) ------------------
# ---- errors: the one place where our exceptions become status codes ----------------------------
def status_for(exc: MaskStudioError) -> int:
    """The HTTP status of one of our errors (errors.py's tree)."""
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, Unauthorized):
        return 401
    if isinstance(exc, (InvalidInput, Conflict)):  # the old backend answered 400 for an id taken
        return 400
    if isinstance(exc, SegmentationError):
        return 502
    return 500


def error_response(status: int, detail: str, **extra: Any) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"detail": detail, **extra}, status_code=status, headers=headers)


def validation_text(errors: list[dict]) -> str:
    """FastAPI's validation errors as one sentence: where, and what was wrong."""
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "Invalid request: " + "; ".join(parts) + more + "."


class LegacyRoute(APIRoute):
    """Every route of this API answers its errors as {"detail": "..."} with the status from status_for."""

    max_body: int | None = None  # bytes; a larger declared body is refused before it is read

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> fastapi.Response:
            try:
                declared = request.headers.get("content-length", "")
                if self.max_body is not None and declared.isdigit() and int(declared) > self.max_body:
                    raise LimitExceeded(f"The request is larger than MAX_UPLOAD_MB allows ({self.max_body:,} bytes).")
                return await handler(request)
            except RequestValidationError as exc:
                errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
                return error_response(422, validation_text(errors), errors=errors)
            except MaskStudioError as exc:
                return error_response(status_for(exc), exc.message)
            except Exception:
                log.exception("Unexpected error in %s %s", request.method, request.url.path)
                return error_response(500, GENERIC_ERROR)

        return guarded


# ---- request and response bodies (what /docs shows) ---------------------------------------------
class GenerateMasksRequest(BaseModel):
    original_image_b64: str = Field(
        ..., description="The image as base64, or a data URL such as 'data:image/png;base64,...'."
    )


class MaskRenderInstruction(BaseModel):
    mask_id: int
    color: list[int] | str | None = Field(
        None,
        description='[r, g, b, a] 0-255 (or [r, g, b], or "#rrggbb(aa)"); null shows the original pixels.',
    )


class RenderMasksRequest(BaseModel):
    render_instructions: list[MaskRenderInstruction] = Field(
        ..., description="Masks to draw, in order (later over earlier), each with its colour."
    )
    background: str = Field(
        "transparent",
        description="What lies outside the masks: transparent (the old backend's canvas), original, dim, "
        "black or white.",
    )


class RenderResponse(BaseModel):
    message: str
    rendered_image_b64: str = Field(..., description="The render as base64 PNG, without a data: prefix.")


# ---- the routes -----------------------------------------------------------------------------------
def legacy_router(studio: Studio, access: Access, settings: Settings) -> APIRouter:
    """The old backend's six endpoints, answered by `studio` for the caller `access` names."""

    class Route(LegacyRoute):
        max_body = settings.max_upload_bytes * 4 // 3 + BASE64_SLACK

    router = APIRouter(route_class=Route, tags=["REST API (the old backend's)"])
    heavy = threading.BoundedSemaphore(HEAVY_CONCURRENCY)

    def scope_of(request: Request) -> Scope:
        return access.api_caller(request.headers).scope

    @router.post("/generate_and_store_masks")
    def generate_and_store_masks(
        request: Request,
        payload: GenerateMasksRequest = Body(...),
        image_id: str | None = Query(None, description="Optional custom id; generated when not given."),
    ) -> dict:
        """Segment an image and store it with its masks."""
        caller = access.api_caller(request.headers)
        data = imaging.decode_base64(payload.original_image_b64)
        client = request.client.host if request.client is not None else None
        with heavy:
            return studio.generate_and_store(data, image_id=image_id or None, owner=caller.owner, address=client)

    @router.post("/render_masks/{image_id}", response_model=RenderResponse)
    def render_masks(image_id: str, request: Request, payload: RenderMasksRequest = Body(...)) -> dict:
        """Render the listed masks with their colours (later over earlier) as a PNG."""
        steps = [
            {"mask_id": i.mask_id, "color": "original" if i.color is None else i.color}
            for i in payload.render_instructions
        ]
        arr = studio.render(image_id, steps, payload.background, scope_of(request))
        return {"message": RENDERED, "rendered_image_b64": base64.b64encode(imaging.encode_png(arr)).decode()}

    @router.get("/images/{image_id}/info")
    def image_info(image_id: str, request: Request) -> StreamingResponse:
        """The image (a data URL), its size and every mask with its PNG (`mask_b64`)."""
        scope = scope_of(request)
        info = studio.info(image_id, scope)  # unknown ids answer 404 here, before the body starts
        return StreamingResponse(_info_chunks(studio, image_id, scope, info), media_type="application/json")

    @router.get("/images")
    def list_images(request: Request) -> dict:
        """The stored images, newest first."""
        return {"images": studio.list_images(scope_of(request))}

    @router.get("/images/{image_id}/mask_at_point")
    def mask_at_point(
        image_id: str,
        request: Request,
        x: float = Query(..., description="Pixel column, from 0 at the left."),
        y: float = Query(..., description="Pixel row, from 0 at the top."),
    ) -> dict:
        """The smallest mask under pixel (x, y), and every mask under it, smallest first."""
        scope = scope_of(request)
        x, y = _number(x), _number(y)  # 150, not 150.0, in answers and messages
        found = studio.mask_at_point(image_id, x, y, scope)
        return _old_point_fields(found, x, y, lambda: studio.find(image_id, scope).mask_count)

    @router.delete("/images/{image_id}")
    def delete_image(image_id: str, request: Request) -> dict:
        """Delete an image, its masks and its files."""
        return studio.delete(image_id, scope_of(request))

    return router


def _number(v: float) -> int | float:
    return int(v) if float(v).is_integer() else v


def _old_point_fields(found: dict, x: float, y: float, mask_count: Callable[[], int]) -> dict:
    """Our answer plus the fields the old backend's mask_at_point had."""
    point = {"x": x, "y": y}
    if found["mask_id"] is None:
        return {
            "message": f"No mask found containing point ({point['x']}, {point['y']})",
            "point": point,
            **found,
            "total_masks_checked": mask_count(),
        }
    return {
        "message": f"Found mask containing point ({point['x']}, {point['y']})",
        "point": point,
        **found,
        "mask_area": found["area"],
        "mask_bbox": found["bbox"],
        "total_containing_masks": len(found["candidates"]),
        "all_containing_masks": found["candidates"],
    }


def _info_chunks(studio: Studio, image_id: str, scope: Scope, info: dict) -> Iterator[bytes]:
    """/images/{id}/info as JSON pieces: the original and each mask's PNG are encoded one at a time,
    so a 128-mask answer never holds more than one PNG (and its base64) in memory."""
    masks = info.pop("available_masks")
    head = json.dumps(info)
    try:
        yield (head[:-1] + ', "original_image_b64": "data:image/png;base64,').encode()
        yield base64.b64encode(imaging.encode_png(studio.load(image_id, scope).rgb))
        yield b'", "available_masks": ['
        for i, m in enumerate(masks):
            yield (("," if i else "") + json.dumps(m)[:-1] + ', "mask_b64": "').encode()
            yield base64.b64encode(studio.mask_png(image_id, m["id"], scope))
            yield b'"}'
        yield b"]}"
    except Exception:
        # The status line has gone out: all we can do is stop (the client sees a truncated body) and log it.
        log.exception("The info of %s failed half-way", image_id)
        raise


# ---- CORS for this API's paths --------------------------------------------------------------------
def is_legacy_path(path: str) -> bool:
    return any(path == p.rstrip("/") or path.startswith(p.rstrip("/") + "/") for p in LEGACY_PATHS)


class LegacyCORS:
    """CORS_ORIGINS for the REST API's paths (none set: no cross-origin access); every other path keeps
    Gradio's own policy. Outermost, so Gradio's CORS middleware (which would allow any origin on a
    public host) never sees an `Origin` on these paths."""

    def __init__(self, app: ASGIApp, origins: tuple[str, ...] = ()):
        self.app = app
        self.cors = CORSMiddleware(
            _WithoutOrigin(app),
            allow_origins=list(origins),
            allow_methods=["*"],
            allow_headers=["*"],
            allow_credentials=True,  # as the old backend: its front end may send cookies or auth headers
        )

    async def __call__(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_legacy_path(scope.get("path", "")):
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)


class _WithoutOrigin:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"origin"]
        await self.app({**scope, "headers": headers}, receive, send)


# ---- mounting -----------------------------------------------------------------------------------------
def mount_legacy_api(
    app: fastapi.FastAPI, studio: Studio, access: Access, settings: Settings, cors_origins: tuple[str, ...] = ()
) -> None:
    """Serve the old REST API, its /docs and /openapi.json, and its CORS policy on Gradio's running app."""
    router = legacy_router(studio, access, settings)
    # Gradio serves nothing at these paths; they go first so that no catch-all of Gradio's can shadow them.
    app.router.routes[0:0] = router.routes
    # /docs and /openapi.json describe this API only (FastAPI's own /openapi.json, further down, would
    # list Gradio's internal routes too).
    schema = get_openapi(
        title="Mask Studio REST API",
        version="1.0.0",
        description='The old backend\'s REST API, served beside the Gradio app. Errors: {"detail": "..."}.',
        routes=router.routes,
    )
    app.router.routes[0:0] = [
        APIRoute("/openapi.json", lambda: JSONResponse(schema), include_in_schema=False),
        APIRoute("/docs", _docs_page, include_in_schema=False, response_class=HTMLResponse),
    ]
    # Gradio has built its middleware by now (launch has served its first requests): ours goes outermost
    # and the stack is rebuilt, so the next request already passes through it.
    app.user_middleware.insert(0, Middleware(LegacyCORS, origins=tuple(cors_origins)))
    app.middleware_stack = app.build_middleware_stack()


def _docs_page() -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title="Mask Studio REST API")
