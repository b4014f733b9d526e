"""What AI agents are told: the MCP switch, and each API endpoint's description with every parameter.

With MCP_SERVER=true (or Gradio's own GRADIO_MCP_SERVER=true) Gradio also serves the app as an MCP
server at /gradio_api/mcp (streamable HTTP; needs the `mcp` package, gradio's `mcp` extra): each public
API endpoint is a tool, described by its function's docstring. Gradio reads a docstring as a
description, then `Args:` with one `name: text` line per parameter, then `Returns:`. The texts live
here, keyed by api_name, so the endpoints' module stays about wiring; `describe_endpoints` puts them
on the endpoint functions before launch (the API page and the MCP tool list read them at launch).
An agent's key travels as on the API: the MCP client's `Authorization: Bearer <key>` header.
"""

from __future__ import annotations

import gradio as gr

IMAGE_ID = "The id of a stored image (as returned by generate_and_store_masks or list_images)."
INSTRUCTIONS = (
    'Masks to paint, later over earlier: a list like [{"mask_id": 3, "color": [255, 0, 0, 128]}]; color is '
    '[r, g, b, a] 0-255, "#rrggbb", "#rrggbbaa", "original" (the photo\'s own pixels) or null (a colour per mask).'
)
BACKGROUND = "What lies outside the painted masks: original (default), dim, transparent, black or white."


def docstring(summary: str, args: dict[str, str], returns: str) -> str:
    """A docstring in the shape Gradio parses: summary, `Args:` (one line per parameter), `Returns:`."""
    lines = [summary]
    if args:
        lines += ["Args:"] + [f"    {name}: {text}" for name, text in args.items()]
    return "\n".join(lines + ["Returns:", f"    {returns}", ""])


ENDPOINT_DOCS: dict[str, str] = {
    "generate_and_store_masks": docstring(
        "Segment a photo into many overlapping masks (objects and their parts) and store it. "
        "Send the image either as `image` (a file) or as `original_image_b64`.",
        {
            "image": "The photo as an uploaded file (PNG, JPEG, WebP, GIF, BMP or TIFF); "
            "leave empty when sending original_image_b64.",
            "image_id": "Optional id to store it under (letters, digits, _ and -); a new id is made when empty.",
            "original_image_b64": "The photo as base64 or a data URL (data:image/png;base64,...); "
            "used when image is empty.",
        },
        '{"message", "image_id", "mask_count", "image_dimensions": {"width", "height"}, "mask_ids", '
        '"mask_urls", "engine", "s3"}',
    ),
    "render_masks": docstring(
        "Paint chosen masks of a stored image in colours and return the full-size composite PNG.",
        {"image_id": IMAGE_ID, "render_instructions": INSTRUCTIONS, "background": BACKGROUND},
        "The composite as a PNG image.",
    ),
    "image_info": docstring(
        "Describe a stored image: its size, creation time, engine and every mask (id, area, bbox, scores).",
        {"image_id": IMAGE_ID},
        '{"image_id", "width", "height", "created_at", "engine", "mask_count", "available_masks": '
        '[{"id", "area", "bbox": [x, y, width, height], "predicted_iou", "stability_score", "mask_url"}]}',
    ),
    "list_images": docstring(
        "List the caller's stored images, newest first.",
        {},
        'A list of {"image_id", "width", "height", "created_at", "mask_count", "name"}; "name" is the uploaded '
        "file's name (an image imported from the old backend: its old id), or null.",
    ),
    "mask_at_point": docstring(
        "Find which masks cover one pixel: the smallest first (the part), then larger ones (the whole).",
        {
            "image_id": IMAGE_ID,
            "x": "Pixel column, 0 at the left edge (image_info gives the width).",
            "y": "Pixel row, 0 at the top edge (image_info gives the height).",
        },
        '{"mask_id": the smallest mask or null, "candidates": every mask id under the pixel, smallest first, '
        '"area", "bbox": [x, y, width, height]}',
    ),
    "delete_image": docstring(
        "Delete a stored image, its masks and its files (also on S3). This cannot be undone.",
        {"image_id": IMAGE_ID},
        '{"message", "image_id"}',
    ),
    "get_mask": docstring(
        "One mask as a black and white PNG of the image's size (255 inside the mask, 0 outside).",
        {
            "image_id": IMAGE_ID,
            "mask_id": "The mask's id (from generate_and_store_masks, image_info or mask_at_point).",
        },
        "The mask as a PNG image.",
    ),
    "export_coco": docstring(
        "Export masks as a COCO annotation dict (RLE segmentations), for training or other tools.",
        {"image_id": IMAGE_ID, "mask_ids": "The mask ids to export; null exports every mask."},
        'A COCO dict with "info", "images", "annotations" and "categories".',
    ),
    "segment": docstring(
        "Segment one object from prompts and store it as a mask of a new image (image) or of a stored one (image_id).",
        {
            "image": "A new photo as an uploaded file; leave empty to prompt on a stored image.",
            "image_id": "The stored image to add the object to (when image is empty).",
            "points": "Pixel points [[x, y], ...] on or off the object.",
            "point_labels": "One label per point: 1 includes the point in the object, 0 excludes it.",
            "box": "Optional box around the object, [x0, y0, x1, y1] in pixels.",
        },
        '{"image_id", "mask_id", "mask_url", "s3", "existing": true when the object was one of the image\'s masks}',
    ),
    "retry_uploads": docstring(
        "Upload to S3 what failed to upload earlier, and finish S3 deletions that failed (the caller's images).",
        {},
        '{"message", "uploaded", "failed", "deleted"}',
    ),
    "share_render": docstring(
        "Render chosen masks like render_masks and upload the composite to S3; returns its URL.",
        {"image_id": IMAGE_ID, "render_instructions": INSTRUCTIONS, "background": BACKGROUND},
        '{"image_id", "url", "key"}',
    ),
}


def describe_endpoints(demo: gr.Blocks) -> list[str]:
    """Give each public endpoint its description (before launch); returns the api names described."""
    described = []
    for block_fn in demo.fns.values():
        name = block_fn.api_name
        if name in ENDPOINT_DOCS and block_fn.fn is not None:
            block_fn.fn.__doc__ = ENDPOINT_DOCS[name]
            described.append(name)
    return described
