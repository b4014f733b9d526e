"""The public, named API endpoints (gradio_client, raw HTTP): each method is one endpoint.

Parameter names, their order and defaults are the contract scripts rely on (README "API"; tests/test_app_api.py
checks them): change none of them. Every endpoint acts as the caller its API key names (Access); our errors are
turned into what the caller sees in one place, app.user_errors, where the endpoints are published.
"""

# No `from __future__ import annotations`: Gradio reads these hints as objects (gr.Request, FileData); it injects
# the request into a parameter hinted `gr.Request | None` too (it compares the hint with Optional[gr.Request]).
from collections.abc import Callable

import gradio as gr
from gradio.data_classes import FileData

import imaging
from access import Access, Caller
from errors import InvalidInput
from studio import Studio
from web_io import Outputs, cancel_on_leave, client_address, upload_bytes, upload_name

# The endpoints that segment share one concurrency group with the page's uploads (a few at a time).
HEAVY = ("generate_and_store_masks", "segment")


class Endpoints:
    """The API endpoints, over one studio; `demo` is the Blocks they are published in (to notice a caller leaving)."""

    def __init__(self, studio: Studio, access: Access, outputs: Outputs, demo: gr.Blocks):
        self.studio, self.access, self.outputs, self.demo = studio, access, outputs, demo

    def all(self) -> list[Callable]:
        """Every endpoint, in the order the API page lists them."""
        return [
            self.generate_and_store_masks,
            self.render_masks,
            self.image_info,
            self.list_images,
            self.mask_at_point,
            self.delete_image,
            self.get_mask,
            self.export_coco,
            self.segment,
            self.retry_uploads,
            self.share_render,
        ]

    def _caller(self, request: gr.Request | None) -> Caller:
        return self.access.api_caller(request.headers if request is not None else {})

    def generate_and_store_masks(
        self,
        image: FileData | None = None,
        image_id: str | None = None,
        original_image_b64: str | None = None,
        request: gr.Request | None = None,
    ) -> dict:
        """Segment an image and store it with its masks. Send `image` (handle_file(path)) or `original_image_b64`.
        Returns {"message", "image_id", "mask_count", "image_dimensions", "mask_ids", "mask_urls", "engine", "s3"}."""
        caller = self._caller(request)
        data = upload_bytes(image)
        if data is None:
            if original_image_b64 is None:
                raise InvalidInput("Send an image: `image` as a file, or `original_image_b64`.")
            data = imaging.decode_base64(original_image_b64)
        with cancel_on_leave(self.demo, request) as cancel:  # the client cancelled or went away: stop segmenting
            return self.studio.generate_and_store(
                data,
                image_id=image_id,
                owner=caller.owner,
                address=client_address(request),
                cancel=cancel,
                name=upload_name(image),
            )

    def render_masks(
        self,
        image_id: str,
        render_instructions: list[dict],
        background: str = "original",
        request: gr.Request | None = None,
    ) -> FileData:
        """The composite as a full-size PNG: instructions [{"mask_id", "color"}], later over earlier."""
        arr = self.studio.render(image_id, render_instructions, background, self._caller(request).scope)
        return FileData(path=self.outputs.write(f"{image_id}-render.png", imaging.encode_png(arr)))

    def image_info(self, image_id: str, request: gr.Request | None = None) -> dict:
        """An image's size, engine and masks (id, area, bbox, scores, mask_url)."""
        return self.studio.info(image_id, self._caller(request).scope)

    def list_images(self, request: gr.Request | None = None) -> list[dict]:
        """Stored images, newest first."""
        return self.studio.list_images(self._caller(request).scope)

    def mask_at_point(self, image_id: str, x: float, y: float, request: gr.Request | None = None) -> dict:
        """The smallest mask containing pixel (x, y), and every containing mask smallest first."""
        return self.studio.mask_at_point(image_id, x, y, self._caller(request).scope)

    def delete_image(self, image_id: str, request: gr.Request | None = None) -> dict:
        """Delete an image, its masks and its files."""
        return self.studio.delete(image_id, self._caller(request).scope)

    def get_mask(self, image_id: str, mask_id: int, request: gr.Request | None = None) -> FileData:
        """One mask as a PNG (0 outside, 255 inside) of the image's size."""
        png = self.studio.mask_png(image_id, mask_id, self._caller(request).scope)
        return FileData(path=self.outputs.write(f"{image_id}-mask-{int(mask_id)}.png", png))

    def export_coco(self, image_id: str, mask_ids: list[int] | None = None, request: gr.Request | None = None) -> dict:
        """A COCO dict (RLE segmentations) of all masks, or of the listed mask ids."""
        return self.studio.export_coco(image_id, mask_ids, self._caller(request).scope)

    def segment(
        self,
        image: FileData | None = None,
        image_id: str | None = None,
        points: list[list[float]] | None = None,
        point_labels: list[int] | None = None,
        box: list[float] | None = None,
        request: gr.Request | None = None,
    ) -> dict:
        """One object from points (label 1 include, 0 exclude) and/or a box [x0, y0, x1, y1], stored as a mask
        of a new image (`image`) or of a stored one (`image_id`).
        Returns {"image_id", "mask_id", "mask_url", "s3", "existing"} (existing: it was one of the image's masks)."""
        caller = self._caller(request)
        data = upload_bytes(image)
        if data is None and not image_id:
            raise InvalidInput("Send an image file (`image`), or the `image_id` of a stored image.")
        with cancel_on_leave(self.demo, request) as cancel:
            return self.studio.segment_object(
                data=data,
                image_id=image_id,
                points=points,
                point_labels=point_labels,
                box=box,
                owner=caller.owner if data is not None else caller.scope,
                address=client_address(request),
                cancel=cancel,
            )

    def retry_uploads(self, request: gr.Request | None = None) -> dict:
        """Upload to S3 what failed earlier (yours) and finish deletions S3 missed.
        Returns {"message", "uploaded", "failed", "deleted"}."""
        return self.studio.retry_uploads(self._caller(request).scope)

    def share_render(
        self,
        image_id: str,
        render_instructions: list[dict],
        background: str = "original",
        request: gr.Request | None = None,
    ) -> dict:
        """Upload a rendered composite to S3. Returns {"image_id", "url", "key"}."""
        return self.studio.share_render(image_id, render_instructions, background, self._caller(request).scope)
