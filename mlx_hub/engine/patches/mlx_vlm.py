"""mlx-vlm 0.4.x: a generation stream made for every thread that generates (``thread_local_stream``).

mlx-vlm 0.4 makes ``generation_stream`` with ``mx.new_stream`` at import.
Since MLX 0.31.2 such a stream exists only on the thread that made it: the
thread that imported mlx-vlm. Every generation runs on a handler's worker
thread, which then fails with "There is no Stream(cpu, 0) in current thread"
(mlx-openai-server issue #290 on Apple silicon). A thread-local stream, as
mlx-lm has used since 0.31, is one stream per thread that uses it.

Proof: tests/test_model_types.py::test_generation_on_another_thread_needs_the_thread_local_stream
generates on a second thread before and after ``apply``.
"""

from __future__ import annotations

import sys

from mlx_hub.engine.patches.switch import enabled


def apply() -> None:
    module = sys.modules.get("mlx_vlm.generate")
    if (
        not enabled("thread_local_stream")
        or module is None
        or getattr(module, "_mlx_hub_thread_local", False)
    ):
        return
    import mlx.core as mx

    make = getattr(mx, "new_thread_local_stream", None)
    if make is None:  # MLX before 0.31.2: streams were not tied to threads
        return
    module.generation_stream = make(mx.default_device())
    module._mlx_hub_thread_local = True
