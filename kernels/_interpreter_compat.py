"""Make Triton 3.6's CPU interpreter work with numpy >= 2.4.

The interpreter turns ``range(n)`` over a runtime scalar into ``int(handle.data)``, and its
scalars are 1-element 1-d arrays; numpy 2.4 made ``int()`` of such an array a TypeError
(upstream: triton-lang/triton issue 9171, fixed there by squeezing first). Until the
pinned Triton carries that fix, this wraps the interpreter's tensor patching to squeeze.
It changes nothing when the interpreter is off or numpy is older.
"""

from __future__ import annotations

import numpy as np


def apply() -> None:
    major, minor = (int(part) for part in np.__version__.split(".")[:2])
    if (major, minor) < (2, 4):
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_dv3_squeezes", False):
        return

    def patch_lang_tensor(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patch_lang_tensor._dv3_squeezes = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patch_lang_tensor
