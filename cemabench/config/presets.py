"""Named presets of the time model: link regimes (bandwidth each way, latency) and device profiles (throughput),
each with the public source of its numbers. A preset is a protocol field (``regime``, ``edge_device``,
``cloud_device``) that stands for the numeric fields it sets; a user's own regime or device is those numbers given
directly (``bandwidth``, ``bandwidth_down``, ``latency``, ``edge_flops_per_s``, ``cloud_flops_per_s``).

What the numbers are, and are not:

- A regime's bandwidths are the median (or, where its source says so, mean) speed-test results its source reports,
  in bytes per second (Mbit/s x 10^6 / 8). Its ``latency`` is the source's round-trip latency halved: the link model
  charges latency once per transfer, in each direction. Speed tests measure a phone's best case toward a nearby
  server; a loaded cell, a far cloud or a congested hour is slower.
- A device's throughput is its peak FP32 rate: cores x 2 FLOP (a fused multiply-add) x boost clock where the source
  gives those, or the vendor's figure. Real networks reach a fraction of peak, so latencies under a device preset are
  lower bounds; a measured throughput is the better number where one exists.
"""
from __future__ import annotations

from dataclasses import dataclass

MBIT = 1e6 / 8  # bytes per second in one Mbit/s


@dataclass(frozen=True)
class Regime:
    bandwidth: float  # uplink, bytes/s
    bandwidth_down: float  # downlink, bytes/s
    latency: float  # seconds per transfer: half the source's round trip
    source: str


@dataclass(frozen=True)
class DeviceProfile:
    flops_per_s: float
    source: str


REGIMES = {
    "mobile-2020": Regime(
        11.22 * MBIT, 35.96 * MBIT, 0.040 / 2,
        "Speedtest Global Index (Ookla), September 2020, global mobile: 35.96 Mbit/s down, 11.22 Mbit/s up, 40 ms, as "
        "reported at https://my-financial-wealth.com/2020/10/25/the-global-mobile-and-broadband-internet-speed-ranking/"),
    "fixed-2020": Regime(
        45.74 * MBIT, 85.73 * MBIT, 0.021 / 2,
        "Speedtest Global Index (Ookla), September 2020, global fixed broadband: 85.73 Mbit/s down, 45.74 Mbit/s up, "
        "21 ms, as reported at "
        "https://my-financial-wealth.com/2020/10/25/the-global-mobile-and-broadband-internet-speed-ranking/"),
    "5g-2023": Regime(
        19.90 * MBIT, 207.42 * MBIT, 0.044 / 2,
        "Ookla Speedtest Intelligence, 5G worldwide median in 2023: 207.42 Mbit/s down, 19.90 Mbit/s up, 44 ms, as "
        "reported at https://phandroid.com/2024/02/19/5g-adoption-has-significantly-increased-worldwide-data-shows/"),
}

DEVICES = {
    "jetson-nano": DeviceProfile(
        128 * 2 * 921e6,
        "NVIDIA Jetson Nano GPU (Maxwell GM20B): 128 CUDA cores at a 921 MHz boost clock, x 2 FLOP per FMA = 235.8 "
        "GFLOP/s FP32 peak; cores and clock from "
        "https://cpu-gpu.alldbin.com/graphics-card-comparison/Jetson-TX2-GPU-and-Jetson-Nano-comparison.html"),
    "jetson-orin-nano-super": DeviceProfile(
        1024 * 2 * 1.02e9,
        "NVIDIA Jetson Orin Nano 8 GB Super (Ampere GA10B): 1,024 CUDA cores at 1.02 GHz, x 2 FLOP per FMA = 2.09 "
        "TFLOP/s FP32 peak; cores and clock from NVIDIA's developer kit datasheet (Dec 2024) as summarised at "
        "https://www.brojogopalsapui.com/ai-foundations/sub_contents/AI_hardware/jetson_orin_nano_light.html"),
    "a100": DeviceProfile(
        19.5e12,
        "NVIDIA A100 Tensor Core GPU: 19.5 TFLOP/s FP32 peak (non-tensor), NVIDIA A100 datasheet "
        "(nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf), as tabulated at "
        "https://glennklockwood.com/garden/processors/A100"),
}

# each preset field, its table of presets, and the numeric fields it sets (in the preset's attribute names)
PRESETS = {
    "regime": (REGIMES, {"bandwidth": "bandwidth", "bandwidth_down": "bandwidth_down", "latency": "latency"}),
    "edge_device": (DEVICES, {"edge_flops_per_s": "flops_per_s"}),
    "cloud_device": (DEVICES, {"cloud_flops_per_s": "flops_per_s"}),
}


def preset_values(field: str, name: str) -> dict[str, float]:
    """The numeric protocol fields that preset ``name`` of preset field ``field`` sets."""
    table, sets = PRESETS[field]
    preset = table[name]
    return {target: getattr(preset, attribute) for target, attribute in sets.items()}


def source(field: str, name: str) -> str:
    return PRESETS[field][0][name].source
