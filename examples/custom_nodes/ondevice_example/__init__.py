"""ondevice example nodes for ComfyUI: text encode, sample and decode, each with its model on the GPU for its run.

Install: put this folder (or a symlink to it) in ``ComfyUI/custom_nodes/`` and ``pip install`` ondevice
into the Python environment that runs ComfyUI. See docs/comfyui-server.md.
"""

from .scoped_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
