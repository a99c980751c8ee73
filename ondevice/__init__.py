"""ondevice: explicit, scoped control over where ComfyUI's model components live.

``with on_gpu(model, vae):`` puts the components' weights on the GPU for the
block and always brings them back to the CPU when it exits.  Importing this
package imports neither ComfyUI nor initializes CUDA.
"""

from __future__ import annotations

from ondevice.comfyui import ComfyUIInfo, comfyui_info, use_comfyui
from ondevice.errors import (
    CheckpointError,
    CheckpointIsADirectoryError,
    CheckpointNotFoundError,
    ComfyUINotFoundError,
    InvalidArgumentError,
    InvalidDeviceError,
    MissingWeightsError,
    NoStrategyError,
    OnDeviceError,
    OutOfDeviceMemory,
    ResidencyConflictError,
    UnknownModelError,
)
from ondevice.loader import Checkpoint, load_checkpoint, load_diffusion_model, load_text_encoders, load_vae
from ondevice.placement import device_of, offload, placement
from ondevice.scope import (
    DeviceMemoryRetainedWarning,
    Prefetch,
    ScopeHandle,
    gpu_scoped,
    keep,
    on_gpu,
    prefetch,
    release,
)
from ondevice.strategies import Expand, register_strategy

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointIsADirectoryError",
    "CheckpointNotFoundError",
    "ComfyUIInfo",
    "ComfyUINotFoundError",
    "DeviceMemoryRetainedWarning",
    "Expand",
    "InvalidArgumentError",
    "InvalidDeviceError",
    "MissingWeightsError",
    "NoStrategyError",
    "OnDeviceError",
    "OutOfDeviceMemory",
    "Prefetch",
    "ResidencyConflictError",
    "ScopeHandle",
    "UnknownModelError",
    "comfyui_info",
    "device_of",
    "gpu_scoped",
    "keep",
    "load_checkpoint",
    "load_diffusion_model",
    "load_text_encoders",
    "load_vae",
    "offload",
    "on_gpu",
    "placement",
    "prefetch",
    "register_strategy",
    "release",
    "use_comfyui",
]

__version__ = "0.1.0"
