"""Report image-generation progress to taskcast, with the Python standard library only.

    from taskcast import Reporter
    reporter = Reporter("http://127.0.0.1:8080", os.environ["TASK_PROCESS_SECRET_KEY"])
    reporter.report(task_id, status="processing", stage="generating", progress=40)
    reporter.report(task_id, status="completed", progress=100, image_url=url)  # or error=...
    reporter.flush(5)  # at the end of a generation: True if everything was delivered

`AsyncReporter` is the same for asyncio code; `StepReporter` turns a sampling loop's steps
(diffusers' `callback_on_step_end`, ComfyUI-style callbacks) into progress.
"""

from ._delivery import FINAL
from .aio import AsyncReporter
from .reporter import Reporter
from .steps import StepReporter

__all__ = ["FINAL", "AsyncReporter", "Reporter", "StepReporter"]
__version__ = "0.1.0"
