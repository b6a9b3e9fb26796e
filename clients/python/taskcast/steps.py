"""Sampling-loop progress: one line in a diffusers pipeline call or a ComfyUI-style loop.

    from taskcast import Reporter, StepReporter
    steps = StepReporter(reporter, task_id, preview=upload_preview, preview_every=5)
    image = pipe(prompt, num_inference_steps=30, callback_on_step_end=steps).images[0]

`StepReporter` is diffusers' `callback_on_step_end` (it reads `pipe.num_timesteps`, returns
`callback_kwargs` unchanged, and sets `pipe._interrupt = True` to stop, the only way a
diffusers pipeline can be stopped from a callback). For any other loop call
`steps.step(i + 1, total)` after each step; it returns True when the loop should stop.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Protocol, Tuple


class _Reports(Protocol):
    def report(self, task_id: Any, **fields: Any) -> None: ...

    def finished(self, task_id: Any) -> Optional[str]: ...

    def is_cancel_requested(self, task_id: Any) -> bool: ...


class StepReporter:
    """Reports step `n` of `total` as `progress` (scaled into `progress_range`).

    - `send_steps`: also send `step` and `total_steps` (browsers show "step 12 of 30").
      On by default; turn it off for a taskcast from before steps (it refuses the whole
      push with 400) or a table without the columns (422 until `taskcast migrate`).
      `progress` is sent either way.
    - `preview(step, latents)`: an upload function returning the URL of a preview picture
      (or None); called every `preview_every` steps, and its URL is pushed as
      `preview_url` (the latest wins; taskcast clears it when the task finishes). It runs in the sampling loop, so keep it quick or hand
      the work to a thread; an exception in it is reported to stderr and ignored.
    - Cancellation: the loop stops when a subscriber asked to cancel the task (the answer
      to a push said `cancel_requested: true`; then `cancelled` is pushed), when
      `should_cancel()` returns True (likewise), or when taskcast has refused this task's
      pushes as finished (409: someone set it to cancelled, failed or completed).
    """

    def __init__(
        self,
        reporter: _Reports,
        task_id: Any,
        *,
        stage: str = "generating",
        total_steps: Optional[int] = None,
        progress_range: Tuple[float, float] = (0.0, 100.0),
        send_steps: bool = True,
        preview: Optional[Callable[[int, Any], Optional[str]]] = None,
        preview_every: int = 5,
        should_cancel: Optional[Callable[[], bool]] = None,
    ) -> None:
        self.reporter, self.task_id, self.stage = reporter, task_id, stage
        self.total_steps, self.progress_range = total_steps, progress_range
        self.send_steps, self.preview = send_steps, preview
        self.preview_every = max(1, preview_every)
        self.should_cancel = should_cancel
        self.stopped: Optional[str] = None  # why the loop was told to stop

    def step(self, step: int, total: Optional[int] = None, latents: Any = None) -> bool:
        """Step `step` (1-based) of `total` is done. True when the loop should stop."""
        if self.stopped is not None:
            return True
        total = total or self.total_steps
        fields: Dict[str, Any] = {"stage": self.stage, "status": "processing"}
        if total:
            low, high = self.progress_range
            fields["progress"] = round(low + (high - low) * min(step, total) / total, 2)
            if self.send_steps:
                # taskcast refuses a step past total_steps.
                fields.update(step=min(step, total), total_steps=total)
        if self.preview is not None and (step % self.preview_every == 0 or step == total):
            try:
                fields["preview_url"] = self.preview(step, latents)
            except Exception as e:
                from ._delivery import note

                note(f"preview for task {self.task_id} failed: {e!r}")
        self.reporter.report(self.task_id, **fields)
        return self._must_stop()

    def _must_stop(self) -> bool:
        refused = self.reporter.finished(self.task_id)
        asked = getattr(self.reporter, "is_cancel_requested", None)
        if refused is not None:
            self.stopped = refused
        elif asked is not None and asked(self.task_id):
            self.stopped = "a subscriber asked to cancel the task"
            self.reporter.report(self.task_id, status="cancelled", stage="cancelled")
        elif self.should_cancel is not None and self.should_cancel():
            self.stopped = "should_cancel() returned True"
            self.reporter.report(self.task_id, status="cancelled", stage="cancelled")
        return self.stopped is not None

    def __call__(
        self, pipe: Any, step_index: int, timestep: Any, callback_kwargs: Dict[str, Any]
    ) -> Dict[str, Any]:
        """diffusers' `callback_on_step_end(pipe, step_index, timestep, callback_kwargs)`."""
        total = self.total_steps or getattr(pipe, "num_timesteps", None)
        if self.step(step_index + 1, total, callback_kwargs.get("latents")):
            pipe._interrupt = True
        return callback_kwargs
