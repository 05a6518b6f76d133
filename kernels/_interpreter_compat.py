"""Two fixes for Triton 3.6's CPU interpreter (``TRITON_INTERPRET=1``), applied only there.

1. numpy >= 2.4: the interpreter turns ``range(n)`` over a runtime scalar into
   ``int(handle.data)`` where its scalars are 1-element 1-d arrays, which numpy 2.4 made a
   TypeError (upstream: triton-lang/triton issue 9171, fixed there by squeezing first).
2. bf16 ``tl.dot``: the interpreter stores bf16 as uint16 and multiplies that storage as
   integers. Operands are widened to fp32 first, which is what the tensor cores compute
   (bf16 products are exact in fp32; accumulation is fp32).

Nothing here runs when the interpreter is off.
"""

from __future__ import annotations

import numpy as np


def _squeeze_scalar_index(interpreter) -> None:
    major, minor = (int(part) for part in np.__version__.split(".")[:2])
    original = interpreter._patch_lang_tensor
    if (major, minor) < (2, 4) or getattr(original, "_dv3_patched", False):
        return

    def patch_lang_tensor(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patch_lang_tensor._dv3_patched = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patch_lang_tensor


def _widen_bf16_dot(interpreter) -> None:
    import triton.language as tl

    builder = interpreter.InterpreterBuilder
    original = builder.create_dot
    if getattr(original, "_dv3_patched", False):
        return

    def widen(handle):
        if handle.dtype.scalar == tl.bfloat16:
            data = interpreter._convert_float(handle.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot._dv3_patched = True  # type: ignore[attr-defined]
    builder.create_dot = create_dot


def apply() -> None:
    from triton.runtime import interpreter

    _squeeze_scalar_index(interpreter)
    _widen_bf16_dot(interpreter)
