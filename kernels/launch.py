"""What a launcher decides, as a value: the kernel, its grid, its arguments and its compile options.

Launchers build a :class:`Launch` and call it. Because the plan is a value, the ahead-of-time
compile check (``python scripts/compile_check.py``) compiles exactly what a launch on a GPU would
compile, with the same specialisation, on a machine without one.
"""

from dataclasses import dataclass, field

import torch
import triton.language as tl

# Contraction of a·b + c into one FMA is stated, not left to a knob whose default Triton is
# changing (3.9 warns, 3.10 flips it): the kernels' rounding must not depend on the Triton release.
ENABLE_FP_FUSION = True

ALIGNMENT_BYTES = 16
"""A 128-bit load needs 16-byte aligned addresses."""


@dataclass(frozen=True)
class Launch:
    kernel: object  # a triton JITFunction
    grid: tuple
    args: tuple  # runtime arguments, in the kernel's parameter order
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps,
                               enable_fp_fusion=ENABLE_FP_FUSION)


def rows_aligned(tensor, row_strides) -> bool:
    """Whether every row of ``tensor`` (rows at ``row_strides`` elements apart, unit column stride)
    starts on a 16-byte boundary, so the kernels may load it 128 bits at a time."""
    size = tensor.element_size()
    return tensor.data_ptr() % ALIGNMENT_BYTES == 0 and all(
        (stride * size) % ALIGNMENT_BYTES == 0 for stride in row_strides)


def accumulator(dtype: torch.dtype):
    """The kernels' accumulation type for inputs of ``dtype``: float64 for float64, int64 for
    integers and booleans (sums exact), else float32."""
    if dtype == torch.float64:
        return tl.float64
    return tl.float32 if dtype.is_floating_point else tl.int64


def coefficients(values, dtype: torch.dtype, device) -> torch.Tensor:
    """Per-call coefficients as a device tensor of the accumulation dtype: Triton would take
    Python floats as float32 (losing float64 precision), and a runtime tensor never recompiles."""
    return torch.tensor(values, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                        device=device)
