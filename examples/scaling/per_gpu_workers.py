"""One worker process per GPU, ondevice inside each: the shape of serving on several GPUs.

    python examples/scaling/per_gpu_workers.py --workers 2 --requests 8 [--comfyui] [--fake-gpu]

Each worker owns one GPU: it pins it (``CUDA_VISIBLE_DEVICES``, set before CUDA starts in that
process), loads its model to the CPU once, then serves the requests sent to it (round robin, as a
load balancer in front of per-GPU servers would), each inside ``with ondevice.on_gpu(...)``: the
weights are on the GPU for the request and back on the CPU after it. Without CUDA (or with
``--fake-gpu``) each worker runs on a fake GPU of its own (``ondevice.testing.fake_gpu``), so the
example runs anywhere. The model is a small torch MLP; ``--comfyui`` serves a checkpoint through
ComfyUI instead (CLIP encode and VAE decode; a synthetic SD1.5 mini file unless ``--checkpoint
FILE``). Ray Serve or a job queue (Celery, RQ) gives the same shape: docs/scaling.md.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import traceback
from typing import Any

import torch

import ondevice
from ondevice.devices import memory_allocated


def load_model(checkpoint: str | None) -> Any:
    """The worker's model, on the CPU: loaded once per process, moved to the GPU per request."""
    if checkpoint is not None:
        return ondevice.load_checkpoint(checkpoint)  # every weight on the CPU
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))


def handle(model: Any, request: int, device: torch.device) -> tuple[int, str]:
    """Serve one request; returns the device memory held during it and a summary of the result."""
    seed = torch.Generator().manual_seed(request)
    with torch.inference_mode():  # as ComfyUI runs its nodes: results keep no device memory alive
        if isinstance(model, ondevice.Checkpoint):
            with ondevice.on_gpu(model.clip, model.vae, device=device):
                cond = model.clip.encode_from_tokens(model.clip.tokenize(f"a lighthouse at dawn, take {request}"))
                image = model.vae.decode(torch.randn(1, 4, 8, 8, generator=seed))
                held = memory_allocated(device)
            return held, f"conditioning {tuple(cond.shape)}, image {tuple(image.shape)}"
        with ondevice.on_gpu(model, device=device):
            out = model(torch.randn(64, 256, generator=seed).to(device)).cpu()
            held = memory_allocated(device)
        return held, f"output {tuple(out.shape)}"


def worker(index: int, gpu: str, *, fake: bool, checkpoint: str | None, inbox: Any, results: Any) -> None:
    """One process, one GPU: load the model once, then serve requests until a None arrives."""
    try:
        if not fake:
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before CUDA starts here: this process sees one GPU
        from ondevice.testing import fake_gpu  # noqa: PLC0415  (only for machines without CUDA)

        with fake_gpu(memory="4GiB") if fake else contextlib.nullcontext():  # this process's own fakegpu:0
            device = torch.device("fakegpu", 0) if fake else torch.device("cuda", 0)
            model = load_model(checkpoint)
            results.put(("ready", index, None))
            for request in iter(inbox.get, None):
                held, summary = handle(model, request, device)
                after = memory_allocated(device)
                results.put(("served", index, (request, os.getpid(), str(device), held, after, summary)))
    except BaseException:
        results.put(("failed", index, traceback.format_exc()))
        raise


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, help="worker processes, one per GPU (default: every GPU; 2 if fake)")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--comfyui", action="store_true", help="serve a checkpoint through ComfyUI")
    parser.add_argument("--checkpoint", help="with --comfyui: this file instead of a synthetic SD1.5 mini")
    parser.add_argument("--fake-gpu", action="store_true", help="fake GPUs even where CUDA is available")
    args = parser.parse_args()

    fake = args.fake_gpu or not torch.cuda.is_available()
    gpus = [str(i) for i in range(args.workers or 2)] if fake else visible_gpus()
    workers = args.workers or len(gpus)
    if workers > len(gpus):
        parser.error(f"--workers {workers}: only {len(gpus)} GPU(s) here; one worker per GPU")
    checkpoint = args.checkpoint
    if args.comfyui and checkpoint is None:
        from ondevice.testing.synthetic import cached_checkpoint  # noqa: PLC0415

        checkpoint = str(cached_checkpoint("sd15", "mini"))  # written once, before the workers read it

    spawn = mp.get_context("spawn")  # fresh interpreters: never fork a process that may hold CUDA state
    inboxes, results = [spawn.Queue() for _ in range(workers)], spawn.Queue()
    setup = {"fake": fake, "checkpoint": checkpoint, "results": results}
    processes = [
        spawn.Process(target=worker, args=(i, gpus[i]), kwargs={**setup, "inbox": inboxes[i]}, daemon=True)
        for i in range(workers)
    ]
    for process in processes:
        process.start()

    def receive(expected: str) -> Any:
        kind, index, payload = results.get(timeout=600)
        if kind == "failed":
            raise SystemExit(f"worker {index} failed:\n{payload}")
        assert kind == expected, (kind, expected)
        return index, payload

    for _ in processes:  # every worker has its model on the CPU before the first request
        print(f"worker {receive('ready')[0]} ready: model loaded to the CPU")
    for request in range(args.requests):
        inboxes[request % workers].put(request)
    served_by = set()
    for _ in range(args.requests):
        index, (request, pid, device, held, after, summary) = receive("served")
        served_by.add(index)
        print(
            f"request {request}: worker {index} (pid {pid}, GPU {gpus[index]}) on {device}: {summary}; "
            f"device memory during {held:,} B, after {after:,} B"
        )
    for inbox in inboxes:
        inbox.put(None)
    for process in processes:
        process.join()
    print(f"{args.requests} requests served by {len(served_by)} of {workers} workers")


if __name__ == "__main__":
    main()
