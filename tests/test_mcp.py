"""The app as an MCP server (MCP_SERVER=true): the official `mcp` client over streamable HTTP lists and calls tools."""

import ast
import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from agent_tools import ENDPOINT_DOCS
from app_server import running_app
from errors import InvalidInput
from helpers import RecordsSegmenter, encode, house_masks, make_photo
from settings import mcp_switch

H, W = 96, 128
PHOTO = make_photo(H, W)
ALICE = {"Authorization": "Bearer alice-key-0123456789"}
BOB = {"Authorization": "Bearer bob-key-0123456789"}


@pytest.mark.parametrize(
    "env, switch",
    [({}, None), ({"MCP_SERVER": "true"}, True), ({"MCP_SERVER": "0"}, False), ({"MCP_SERVER": " "}, None)],
)
def test_mcp_switch(env, switch):
    assert mcp_switch(env) is switch


def test_mcp_switch_refuses_a_typo():
    with pytest.raises(InvalidInput, match="MCP_SERVER must be true or false"):
        mcp_switch({"MCP_SERVER": "ture"})


@pytest.fixture(scope="module")
def described_demo(tmp_path_factory):
    """The demo as app.launch builds and describes it, without starting a server."""
    import app
    from agent_tools import describe_endpoints
    from settings import Settings

    studio = app.create_studio(Settings(data_dir=tmp_path_factory.mktemp("docs"), segmenter="builtin"))
    try:
        demo = app.build_demo(studio.settings, studio)
        assert sorted(describe_endpoints(demo)) == sorted(ENDPOINT_DOCS)
        yield demo
    finally:
        studio.segmenter.close()


def test_every_endpoint_description_names_each_of_its_parameters(described_demo):
    """What agents read: a description, a line for every parameter, and what comes back."""
    import inspect

    import gradio.utils

    described = {fn.api_name: fn.fn for fn in described_demo.fns.values() if fn.api_name in ENDPOINT_DOCS}
    assert set(described) == set(ENDPOINT_DOCS)
    for name, fn in described.items():
        description, params, returns = gradio.utils.get_function_description(fn)
        wanted = [p for p in inspect.signature(fn).parameters if p != "request"]
        assert description and returns, name
        assert all(params[p] for p in wanted), (name, params)


try:
    import mcp  # noqa: F401  (gradio's mcp extra)

    NO_MCP = None
except ImportError:
    NO_MCP = (
        "the `mcp` package (gradio's mcp extra) is not installed: gradio[mcp] 6.31 pins pydantic<=2.12.5, "
        "the shared venv has pydantic 2.14.4"
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if NO_MCP:
        pytest.skip(NO_MCP)
    keys = (("alice", ALICE["Authorization"][7:]), ("bob", BOB["Authorization"][7:]))
    with running_app(
        tmp_path_factory.mktemp("mcp"),
        RecordsSegmenter(house_masks),
        auth_mode="keys",
        app_api_keys=keys,
        mcp_server=mcp_switch({"MCP_SERVER": "true"}),
    ) as (url, _, _):
        yield url


async def _session_run(url: str, headers: dict, calls):
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async with httpx.AsyncClient(headers=headers, timeout=120) as http:
        async with streamable_http_client(url.rstrip("/") + "/gradio_api/mcp/", http_client=http) as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return await calls(session)


def run(url, headers, calls):
    return asyncio.run(_session_run(url, headers, calls))


def text_of(result) -> dict:
    """A dict answer: Gradio's MCP server sends it as str(dict), Python's repr, not JSON."""
    assert not result.isError, result.content
    return ast.literal_eval(next(c.text for c in result.content if c.type == "text"))


def test_tools_are_the_api_endpoints_each_described(server):
    async def calls(session):
        return (await session.list_tools()).tools

    tools = {t.name: t for t in run(server, ALICE, calls)}
    assert set(ENDPOINT_DOCS) <= set(tools)
    render = tools["render_masks"]
    assert render.description.startswith("Paint chosen masks")
    props = render.inputSchema["properties"]
    assert set(props) == {"image_id", "render_instructions", "background"}
    assert all(p.get("description") for p in props.values())
    assert "x" in tools["mask_at_point"].inputSchema["properties"]


def test_generate_mask_at_point_render_through_mcp_with_the_callers_key(server):
    data_url = "data:image/png;base64," + base64.b64encode(encode(PHOTO)).decode()

    async def calls(session):
        made = await session.call_tool(
            "generate_and_store_masks", {"image_id": "agent", "original_image_b64": data_url}
        )
        hit = await session.call_tool("mask_at_point", {"image_id": "agent", "x": 38, "y": 60})
        window = text_of(hit)["mask_id"]
        rendered = await session.call_tool(
            "render_masks",
            {"image_id": "agent", "render_instructions": [{"mask_id": window, "color": [0, 255, 0, 255]}]},
        )
        return made, hit, rendered

    made, hit, rendered = run(server, ALICE, calls)
    assert text_of(made)["image_id"] == "agent" and text_of(made)["mask_count"] == 4
    assert len(text_of(hit)["candidates"]) == 3
    assert not rendered.isError, rendered.content
    images = [c for c in rendered.content if c.type == "image"]
    assert images and images[0].mimeType == "image/png"
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(images[0].data))))
    assert img.shape[:2] == (H, W) and tuple(img[60, 38][:3]) == (0, 255, 0)
    # Stored as alice's (the MCP client's key), invisible to bob, as on the other APIs.
    listed = httpx.get(server.rstrip("/") + "/images", headers=ALICE).json()["images"]
    assert [i["image_id"] for i in listed] == ["agent"]
    assert httpx.get(server.rstrip("/") + "/images/agent/info", headers=BOB).status_code == 404


def test_a_refusal_reaches_the_agent_as_a_tool_error(server):
    async def calls(session):
        return await session.call_tool("image_info", {"image_id": "nope"})

    result = run(server, ALICE, calls)
    assert result.isError
    assert "No image with id 'nope'" in " ".join(getattr(c, "text", "") for c in result.content)
