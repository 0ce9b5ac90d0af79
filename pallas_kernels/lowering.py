"""Which lowering a kernel runs, named in one vocabulary shared by the kernel entry points
(`implementation=`) and kvjax (`attention_impl=`): `NAMES`, parsed into a `Lowering`.

  "auto"            from `jax.default_backend()`: the GPU or TPU kernels, the jnp reference on CPU
                    and on GPUs below compute capability 8.0 (e.g. a T4), where the kernels
                    do not lower (`MIN_GPU_COMPUTE_CAPABILITY`)
  "reference"       the jnp reference
  "tpu"             Mosaic TPU
  "gpu"             generic Pallas on the Triton backend
  "mosaic_gpu"      the Hopper kernels (where a kernel has them)
  "tpu-interpret"   the TPU kernel in its CPU interpreter
  "gpu-interpret"   the Triton kernel in its CPU interpreter
"""

from __future__ import annotations

import dataclasses

import jax
from jax.experimental.pallas import tpu as pltpu

PLATFORMS = ("tpu", "gpu", "mosaic_gpu", "reference")
WITHOUT_MOSAIC_GPU = ("tpu", "gpu", "reference")  # kernels that have no Hopper lowering
NAMES = ("auto", "reference", "tpu", "gpu", "mosaic_gpu", "tpu-interpret", "gpu-interpret")
_INTERPRET = "-interpret"
# The oldest GPU generation the Pallas GPU kernels target (Ampere). On older GPUs (Volta, the T4's Turing)
# Triton cannot compile them (no bf16 tensor-core dots below sm_80), so "auto" runs the jnp reference there.
MIN_GPU_COMPUTE_CAPABILITY = (8, 0)
_NO_MOSAIC_GPU_INTERPRETER = (
    "the Mosaic GPU kernels cannot run interpreted here: JAX 0.10's GPU interpreter lacks their "
    "transposed and register-operand wgmma (the test suite adds them: tests/mosaic_gpu_interpreter.py)"
)


@dataclasses.dataclass(frozen=True)
class Lowering:
    """A kernel's lowering: `platform` ("tpu", "gpu" (Triton), "mosaic_gpu" (Hopper) or
    "reference" (jnp)), run in its CPU interpreter when `interpret` (tpu and gpu only).
    `Lowering.parse(name)` reads a name of `NAMES`; `.name` spells it back."""

    platform: str
    interpret: bool = False

    def __post_init__(self):
        if self.platform not in PLATFORMS:
            raise ValueError(f"Lowering.platform must be one of {PLATFORMS}, got {self.platform!r}")
        if not isinstance(self.interpret, bool):
            raise ValueError(f"Lowering.interpret must be a bool, got {self.interpret!r}")
        if self.interpret and self.platform == "mosaic_gpu":
            raise ValueError(_NO_MOSAIC_GPU_INTERPRETER)
        if self.interpret and self.platform == "reference":
            raise ValueError("the reference is plain jnp: it has no interpreter to run in")

    @classmethod
    def parse(cls, name: str, what: str = "lowering") -> Lowering:
        """The lowering `name` (one of `NAMES`) means here; "auto" reads `jax.default_backend()`.
        Raises ValueError naming the choices (`what` names the argument in the message)."""
        check_name(name, what)
        if name == "auto":
            backend = jax.default_backend()
            if backend == "gpu" and not gpu_runs_kernels():
                return cls("reference")
            return cls(backend if backend in ("gpu", "tpu") else "reference")
        return cls(name.removesuffix(_INTERPRET), name.endswith(_INTERPRET))

    @property
    def name(self) -> str:
        """This lowering's name in `NAMES`."""
        return self.platform + (_INTERPRET if self.interpret else "")


def gpu_compute_capability() -> tuple[int, int] | None:
    """The default device's CUDA compute capability as (major, minor), or None where it has none
    (not a GPU, a ROCm GPU, or a device that does not report it)."""
    device = jax.devices()[0]
    text = str(getattr(device, "compute_capability", "") or "") if device.platform == "gpu" else ""
    try:
        major, minor = (int(x) for x in text.split(".")[:2])
    except ValueError:
        return None
    return major, minor


def gpu_runs_kernels() -> bool:
    """Whether "auto" may pick the Pallas GPU kernels: True unless the default GPU reports a compute
    capability below `MIN_GPU_COMPUTE_CAPABILITY` (then "auto" falls back to the jnp reference;
    naming "gpu" still forces the kernels)."""
    capability = gpu_compute_capability()
    return capability is None or capability >= MIN_GPU_COMPUTE_CAPABILITY


def check_name(name: object, what: str = "lowering") -> None:
    """Raises ValueError unless `name` is one of `NAMES` (without resolving "auto")."""
    if isinstance(name, str) and name == f"mosaic_gpu{_INTERPRET}":
        raise ValueError(_NO_MOSAIC_GPU_INTERPRETER)
    if not isinstance(name, str) or name not in NAMES:
        raise ValueError(f"{what} must be one of {NAMES}, got {name!r}")


def resolve(
    implementation: str | Lowering,
    interpret: bool | pltpu.InterpretParams = False,
    platforms: tuple[str, ...] = PLATFORMS,
) -> Lowering:
    """The lowering a kernel entry point runs for its `implementation` (a name of `NAMES` or a
    `Lowering`) and `interpret` arguments.

    interpret (True, or `pltpu.InterpretParams` configuring the TPU interpreter: eager DMAs, race
    detection) runs the chosen kernel interpreted, as the "-interpret" names do; under "auto" off a
    GPU or TPU that is the TPU kernel. The reference ignores it. platforms: the kernel's lowerings.
    """
    if isinstance(implementation, Lowering):
        lowering = implementation
    elif implementation == "auto" and interpret and jax.default_backend() not in ("gpu", "tpu"):
        lowering = Lowering("tpu")
    else:
        lowering = Lowering.parse(implementation, "implementation")
    if lowering.platform not in platforms:
        names = tuple(n for n in NAMES if n == "auto" or n.removesuffix(_INTERPRET) in platforms)
        raise ValueError(f"implementation must be one of {names} here, got {lowering.name!r}")
    if interpret and lowering.platform != "reference":
        lowering = Lowering(lowering.platform, True)  # refuses "mosaic_gpu"
    if isinstance(interpret, pltpu.InterpretParams) and lowering.platform != "tpu":
        raise ValueError(
            f"pltpu.InterpretParams configure the TPU kernel's interpreter, not implementation={lowering.name!r}"
        )
    return lowering


def pallas_interpret(lowering: Lowering, interpret: bool | pltpu.InterpretParams) -> bool | pltpu.InterpretParams:
    """The `interpret` a kernel hands its lowering: the caller's `pltpu.InterpretParams`, else
    `lowering.interpret`."""
    return interpret if isinstance(interpret, pltpu.InterpretParams) else lowering.interpret


def tpu_interpret(interpret: bool | pltpu.InterpretParams) -> pltpu.InterpretParams | bool:
    """pallas_call's `interpret` for a Mosaic TPU kernel: the given params, default ones for True."""
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    return pltpu.InterpretParams() if interpret else False
