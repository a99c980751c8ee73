"""Test-only ComfyUI custom node: the fake GPU, switched on as ComfyUI loads it, and a route reporting it.

ComfyUI's ``main.py`` imports ``comfy.model_management`` before it loads custom nodes, so
``start()`` patches ComfyUI there and then: from the first prompt on, ComfyUI and ondevice
both use ``fakegpu:0`` as the GPU. ``GET /ondevice-test/memory`` answers with JSON:
``allocated`` (bytes live on ``fakegpu:0``), ``bytes_to_device`` (copied to it since start),
``held`` (weights that live scopes hold) and ``loaded`` (ComfyUI's ``current_loaded_models``,
as the device of each entry's weights).
"""

from __future__ import annotations

from typing import Any

import comfy.model_management as mm
import server
from aiohttp import web

from ondevice.residency import table
from ondevice.testing import fake_gpu

GPU = fake_gpu("8GiB").start()


def _loaded_devices() -> list[str]:
    return [str(getattr(entry.model, "current_loaded_device", lambda: None)()) for entry in mm.current_loaded_models]


@server.PromptServer.instance.routes.get("/ondevice-test/memory")
async def memory(request: web.Request) -> web.Response:  # noqa: ARG001  (aiohttp passes the request)
    report: dict[str, Any] = {
        "active": GPU.active,
        "allocated": GPU.memory_allocated(),
        "bytes_to_device": GPU.bytes_to_device,
        "held": len(table.held()),
        "loaded": _loaded_devices(),
    }
    return web.json_response(report)


NODE_CLASS_MAPPINGS: dict[str, type] = {}
