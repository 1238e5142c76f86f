"""Throughput and MFU every `window` optimizer steps: images/s, MFU, data-loader wait, peak memory.

Rank 0 logs `perf/img_per_s` (this rank's images x world size / wall time),
`perf/img_per_s_per_device`, `perf/mfu` (U-Net training FLOPs per image x img/s per device / the
device's peak bf16 FLOP/s), `perf/data_wait_frac`, `perf/peak_mem_gb` (CUDA:
`torch.cuda.max_memory_allocated()` so far / 1e9), `perf/alloc_retries` (CUDA: the caching
allocator's retries so far, each a cudaFree of its cache and a device sync after a failed
cudaMalloc: a run near the card's limit slows there, and `PYTORCH_CUDA_ALLOC_CONF=
expandable_segments:True` or a smaller batch helps), `perf/state_mem_gb` (this device's parameters,
gradients, optimizer state and EMA: under FSDP its shards) and, once, `perf/flops_per_img`.

The wait is the time from one step's `on_train_batch_end` to the next `on_train_batch_start`
(Lightning fetches the batch and moves it to the device in between). On CPU it is host time. On
CUDA host time misleads: a host running ahead waits on the loader while queued kernels still run
(no stall), and a blocking copy or `.item()` makes it wait for the GPU (a stall not the loader's).
So each hook records a CUDA event and the wait is the GPU's idle gap between the two: zero while
the host keeps ahead. Events are read and the device synced only at a window's end (a sync per step
would slow training); that sync makes the wall time cover the window's queued GPU work. Work done
between steps counts as wait too: checkpoint saves (ModelCheckpoint runs after every other
callback), validation, later callbacks. The first window includes warm-up.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from typing import Any

import lightning as L
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from sdtrain.datamodules import batch as B
from sdtrain.models.family import SD, Family

log = logging.getLogger(__name__)

# Dense (no sparsity) bf16 tensor-core peak FLOP/s, from NVIDIA's data sheets, by the words of
# `torch.cuda.get_device_name()`; the first entry whose words all appear wins, so variants first.
PEAK_BF16_FLOPS = (
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989e12),  # SXM: "NVIDIA H100 80GB HBM3"
    ("h200 nvl", 835e12),
    ("h200", 989e12),
    ("gh200", 989e12),
    ("a100", 312e12),  # SXM and PCIe
    ("l40s", 362e12),
    ("l40", 181e12),
    ("l4", 121e12),
)


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's FLOP table has the CUDA attention kernels but not the fused CPU one: without this,
# attention would count as free on CPU.
_CPU_SDPA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
EXTRA_FLOP_FORMULAS = {_CPU_SDPA: _sdpa_flops} if _CPU_SDPA is not None else {}


def peak_flops_for(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a CUDA device, by name; None for a device the table lacks."""
    words = set(device_name.lower().replace("-", " ").split())
    return next((peak for name, peak in PEAK_BF16_FLOPS if set(name.split()) <= words), None)


def mfu(flops_per_img: float, img_per_s_per_device: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: the FLOP/s the model's maths needs at this speed, over the peak."""
    return flops_per_img * img_per_s_per_device / peak_flops


def wait_fraction(wait_s: float, total_s: float) -> float:
    """Share of `total_s` seconds spent waiting (`wait_s`); 0 for an empty window."""
    return wait_s / total_s if total_s > 0 else 0.0


def training_state_bytes(trainer, pl_module) -> int:
    """Bytes this device holds for the training state: the trainable parameters, their
    gradients, the optimizer's state and the EMA shadow (under FSDP, this rank's shards). Tensors
    held elsewhere (an EMA kept on the host, model.ema.device=cpu; AdamW's step counts) are not
    counted."""
    from sdtrain.training.sharding import local

    params = [p for _, p in getattr(pl_module, "trainable_parameters", lambda: [])()]
    tensors = params + [p.grad for p in params if p.grad is not None]
    for opt in getattr(trainer, "optimizers", []):
        tensors += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    ema = getattr(pl_module, "ema", None)
    if ema is not None and ema.shadow is not None:
        tensors += list(ema.shadow.values())
    on = {local(p).device for p in params}
    return sum(local(t).numel() * t.element_size() for t in tensors if local(t).device in on)


def unet_input_shapes(batch: dict[str, Any], unet, vae, text_encoder):
    """(1, C, h, w) latents and (1, L, D) context: one sample of `batch`, as the U-Net sees it."""
    image = B.image_key(batch)
    h, w = batch[image].shape[-2:]
    if image == B.PIXELS:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)  # 8 for SD's VAE
        h, w = h // factor, w // factor
    if B.text_key(batch) == B.CONTEXT:
        length, dim = batch[B.CONTEXT].shape[1:]
    else:
        dim = getattr(text_encoder, "context_dim", None)  # SDXL's pair: both encoders' widths
        length, dim = batch[B.INPUT_IDS].shape[-1], dim or text_encoder.config.hidden_size
    return (1, unet.config.in_channels, int(h), int(w)), (1, int(length), int(dim))


def unet_train_flops(
    unet, latent_shape: tuple[int, ...], context_shape: tuple[int, ...], family: Family = SD
) -> float:
    """Training FLOPs per image of the U-Net: 3 x one forward pass (backward ~ 2 x forward).

    Shapes include the batch, (B, C, h, w) and (B, L, D); the count is divided by B. 3 x forward
    is the usual convention (Kaplan et al. 2020; PaLM's MFU): it counts the model's maths, not
    the recomputation gradient checkpointing adds, and gives DESIGN.md's SD-1.5 costs (0.54 TFLOP
    at 256 px, 2.41 at 512); a counted forward + backward is 0.6% less (the first conv needs no
    input gradient). The pass runs under no_grad in eval mode, so it leaves no gradients, draws no
    random numbers (no dropout) and keeps no activations. It runs eagerly (torch >= 2.6's
    "force_eager" stance): dynamo never compiles a module first called under a FLOP counter, so a
    compiled U-Net would train uncompiled (on older torch, compile after the count).
    """
    device, was_training = unet.device, unet.training
    x = torch.zeros(latent_shape, device=device)
    context = torch.zeros(context_shape, device=device)
    t = torch.zeros(latent_shape[0], dtype=torch.long, device=device)
    stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    unet.eval()
    try:
        counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)
        with stance("force_eager") if stance else nullcontext(), torch.no_grad(), counter:
            unet(x, t, **family.unet_inputs(family.example_condition(unet, context)))
    finally:
        unet.train(was_training)
    return 3 * counter.get_total_flops() / latent_shape[0]


class ThroughputMonitor(L.Callback):
    """Logs images/s, MFU, data-loader wait and peak memory every `window` optimizer steps.

    Images are counted per micro-batch (`sdtrain.datamodules.batch.batch_size`), so a window holds all the
    micro-batches of its optimizer steps under gradient accumulation. Every rank is assumed to
    take the same batch size (no collective: a monitor must not risk a hang).

    Args:
        window: log every this many optimizer steps.
        peak_flops: the device's peak FLOP/s for MFU; None looks the card up in
            `PEAK_BF16_FLOPS` (on CPU or an unknown card, no MFU is logged).
    """

    def __init__(self, window: int = 20, peak_flops: float | None = None) -> None:
        if window < 1:
            raise ValueError(f"callbacks.throughput.window={window}: must be >= 1")
        if peak_flops is not None and peak_flops <= 0:
            raise ValueError(f"callbacks.throughput.peak_flops={peak_flops}: must be > 0 (FLOP/s)")
        self.window = window
        self.peak_flops = peak_flops
        self.flops_per_img: float | None = None  # counted once, at the first batch
        self.clock = time.perf_counter  # host seconds; tests swap in their own
        self._peak: float | None = None
        self._start: float | None = None  # the window's start; None until the first batch
        self._start_step = self._images = 0
        self._wait = 0.0  # seconds (CPU: host time between the hooks)
        self._gaps: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # CUDA: (end, start)
        self._last_end: float | torch.cuda.Event = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = None
        self._peak = self.peak_flops
        if self._peak is None and pl_module.device.type == "cuda":
            self._peak = peak_flops_for(torch.cuda.get_device_name(pl_module.device))
        if self._peak is None and trainer.is_global_zero:
            log.info(
                "no peak FLOP/s known for device %s: perf/mfu is not logged "
                "(set callbacks.throughput.peak_flops)",
                pl_module.device,
            )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            if self.flops_per_img is None:
                self._count_flops(trainer, pl_module, batch)
            self._sync(pl_module)
            self._start, self._start_step = self.clock(), trainer.global_step
            self._images, self._wait, self._gaps = 0, 0.0, []
        elif isinstance(self._last_end, torch.cuda.Event):
            self._gaps.append((self._last_end, self._mark(pl_module)))
        else:
            self._wait += self.clock() - self._last_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # every micro-batch counts; global_step moves only on optimizer steps
        self._images += B.batch_size(batch)
        if trainer.global_step - self._start_step >= self.window:
            self._sync(pl_module)  # the window's queued GPU work is done: its wall time is honest
            end = self.clock()
            self._log(
                trainer,
                self._metrics(trainer, pl_module, end - self._start),
                trainer.global_step - 1,
            )
            self._start, self._start_step = end, trainer.global_step
            self._images, self._wait, self._gaps = 0, 0.0, []
        self._last_end = self._mark(pl_module)

    def _metrics(self, trainer, pl_module, seconds: float) -> dict[str, float]:
        per_device = self._images / seconds
        wait = self._wait + sum(end.elapsed_time(start) for end, start in self._gaps) / 1e3  # ms
        metrics = {
            "perf/img_per_s": per_device * trainer.world_size,
            "perf/img_per_s_per_device": per_device,
            "perf/data_wait_frac": wait_fraction(wait, seconds),
        }
        if self.flops_per_img and self._peak:
            metrics["perf/mfu"] = mfu(self.flops_per_img, per_device, self._peak)
        if pl_module.device.type == "cuda":
            metrics["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated(pl_module.device) / 1e9
            stats = torch.cuda.memory_stats(pl_module.device)  # host counters: no sync
            metrics["perf/alloc_retries"] = float(stats.get("num_alloc_retries", 0))
        state = training_state_bytes(trainer, pl_module)
        if state:  # a module with trainable parameters
            metrics["perf/state_mem_gb"] = state / 1e9
        return metrics

    def _count_flops(self, trainer, pl_module, batch: dict[str, Any]) -> None:
        """Count the U-Net's FLOPs per image at this run's shapes; on failure, go on without MFU."""
        shapes = unet_input_shapes(batch, pl_module.unet, pl_module.vae, pl_module.text_encoder)
        try:
            with trainer.precision_plugin.forward_context():
                family = getattr(pl_module, "family", SD)
                self.flops_per_img = unet_train_flops(pl_module.unet, *shapes, family)
        except Exception as err:  # a monitor must not stop the run
            log.warning("counting the U-Net's FLOPs failed (%r): perf/mfu is not logged", err)
            self.flops_per_img = 0
            return
        if trainer.is_global_zero:
            # Said only where it gives an MFU (a known peak): without one (CPU, an unknown card
            # with its own warning) the count is only perf/flops_per_img in the logger.
            log.log(
                logging.INFO if self._peak else logging.DEBUG,
                "U-Net training FLOPs per image: %.4g TFLOP (3 x forward; latents %s, context %s);"
                " %s",
                self.flops_per_img / 1e12,
                shapes[0],
                shapes[1],
                f"peak {self._peak / 1e12:.0f} TFLOP/s: perf/mfu is logged"
                if self._peak
                else "no peak known: no perf/mfu",
            )
        self._log(trainer, {"perf/flops_per_img": float(self.flops_per_img)}, trainer.global_step)

    def _mark(self, pl_module) -> float | torch.cuda.Event:
        """Now: host seconds on CPU; on CUDA an event the GPU reaches when its queue gets here."""
        if pl_module.device.type != "cuda":
            return self.clock()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    @staticmethod
    def _log(trainer, metrics: dict[str, float], step: int) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
