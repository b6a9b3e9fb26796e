"""StepReporter as diffusers' callback_on_step_end, against a live taskcast.

`StandInPipeline` runs the denoising loop of diffusers' StableDiffusionPipeline.__call__
(diffusers 0.2x-0.3x) with the model replaced by arithmetic: the same `interrupt` check,
the same callback call and the same use of what the callback returns. No weights."""

from __future__ import annotations

import time

from taskcast import Reporter, StepReporter


class StandInPipeline:
    def __init__(self, step_seconds: float = 0.0) -> None:
        self.step_seconds = step_seconds
        self._interrupt = False
        self.steps_run = 0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def __call__(self, num_inference_steps=30, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",)):
        timesteps = [999 - i * (1000 // num_inference_steps) for i in range(num_inference_steps)]
        self._num_timesteps = len(timesteps)
        self._interrupt = False
        latents = 0.0
        for i, t in enumerate(timesteps):
            if self.interrupt:
                continue
            latents = latents + 1.0  # the UNet and scheduler step
            time.sleep(self.step_seconds)
            self.steps_run += 1
            if callback_on_step_end is not None:
                callback_kwargs = {"latents": latents}
                callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                latents = callback_outputs.pop("latents", latents)
        return latents


class RecordingReporter(Reporter):
    """A real Reporter that also remembers what it was asked to send."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked = []

    def report(self, task_id, **fields):
        self.asked.append(fields)
        super().report(task_id, **fields)


def test_each_step_is_reported_as_progress_and_the_pipeline_is_untouched(server):
    task = server.create_task()
    reporter = RecordingReporter(server.url, server.key)
    pipe = StandInPipeline()
    steps = StepReporter(reporter, task, progress_range=(0, 90))
    assert pipe(num_inference_steps=20, callback_on_step_end=steps) == 20.0
    assert reporter.flush(10)
    assert pipe.steps_run == 20
    assert [f["progress"] for f in reporter.asked] == [round(90 * (i + 1) / 20, 2) for i in range(20)]
    state = server.state(task)
    assert (state["progress"], state["stage"], state["status"]) == (90.0, "generating", "processing")
    assert (state["step"], state["total_steps"]) == (20, 20)


def test_step_and_total_steps_are_sent_unless_turned_off():
    reporter = RecordingReporter("http://127.0.0.1:9", "key", attempts=1)
    StandInPipeline()(num_inference_steps=3, callback_on_step_end=StepReporter(reporter, "t"))
    assert [(f["step"], f["total_steps"], f["progress"]) for f in reporter.asked] == [
        (1, 3, 33.33), (2, 3, 66.67), (3, 3, 100.0)]
    older = RecordingReporter("http://127.0.0.1:9", "key", attempts=1)
    StandInPipeline()(num_inference_steps=3, callback_on_step_end=StepReporter(
        older, "t", send_steps=False))
    assert all("step" not in f and "total_steps" not in f for f in older.asked)


def test_previews_are_uploaded_every_n_steps_and_pushed_as_preview_url(server):
    task = server.create_task()
    reporter = Reporter(server.url, server.key)
    uploads = []

    def upload(step, latents):
        uploads.append((step, latents))
        return f"https://cdn.example.com/preview/{task}/{step}.png"

    pipe = StandInPipeline()
    pipe(num_inference_steps=12, callback_on_step_end=StepReporter(
        reporter, task, preview=upload, preview_every=5))
    assert reporter.flush(10)
    assert uploads == [(5, 5.0), (10, 10.0), (12, 12.0)]
    state = server.state(task)
    assert state["preview_url"] == f"https://cdn.example.com/preview/{task}/12.png"
    assert "image_url" not in state


def test_should_cancel_interrupts_the_pipeline_and_pushes_cancelled(server):
    task = server.create_task()
    reporter = Reporter(server.url, server.key)
    pipe = StandInPipeline()
    steps = StepReporter(reporter, task, should_cancel=lambda: pipe.steps_run >= 4)
    pipe(num_inference_steps=30, callback_on_step_end=steps)
    assert reporter.flush(10)
    assert pipe.steps_run == 4, "diffusers skips every step after _interrupt is set"
    state = server.state(task)
    assert state["status"] == "cancelled" and state["progress"] == round(100 * 4 / 30, 2)


def test_a_task_cancelled_elsewhere_stops_the_pipeline(server):
    task = server.create_task()
    reporter = Reporter(server.url, server.key)
    pipe = StandInPipeline(step_seconds=0.05)

    def cancel_from_the_app(step, latents):
        if step == 3:  # the app cancels the task while the generator is at step 3
            server.call("POST", f"/api/tasks/{task}/progress", {"status": "cancelled"})
        return None

    steps = StepReporter(reporter, task, preview=cancel_from_the_app, preview_every=1)
    pipe(num_inference_steps=40, callback_on_step_end=steps)
    assert 3 <= pipe.steps_run < 40, pipe.steps_run
    assert "cancelled" in (steps.stopped or ""), steps.stopped
    assert server.state(task)["status"] == "cancelled"


def test_a_subscribers_cancel_request_stops_the_pipeline_and_pushes_cancelled(server):
    task, token = server.create_cancellable()
    reporter = Reporter(server.url, server.key)
    pipe = StandInPipeline(step_seconds=0.05)

    def page_cancels(step, latents):
        if step == 3:  # the page asks while the generator is at step 3
            assert server.cancel(task, token)["cancel_requested"] is True
        return None

    steps = StepReporter(reporter, task, preview=page_cancels, preview_every=1)
    pipe(num_inference_steps=40, callback_on_step_end=steps)
    assert reporter.flush(10)
    assert 3 <= pipe.steps_run < 40, pipe.steps_run
    assert steps.stopped == "a subscriber asked to cancel the task", steps.stopped
    state = server.state(task)
    assert (state["status"], state["cancel_requested"]) == ("cancelled", True)


def test_a_failing_preview_upload_does_not_stop_the_generation(server, capsys):
    task = server.create_task()
    reporter = Reporter(server.url, server.key)

    def broken(step, latents):
        raise OSError("bucket unreachable")

    pipe = StandInPipeline()
    pipe(num_inference_steps=5, callback_on_step_end=StepReporter(
        reporter, task, preview=broken, preview_every=1))
    assert reporter.flush(10)
    assert pipe.steps_run == 5
    assert server.state(task)["progress"] == 100.0
    assert "bucket unreachable" in capsys.readouterr().err
