"""Watching a training run: Trainer callbacks that report progress and stop at a safe point.

Owns: turning the Trainer's log events into small progress dicts (step,
total, epoch, loss, eval loss, learning rate, ETA) for whoever listens (the
command line's progress bar, a background job's JSON lines), and honouring a
stop request by asking the Trainer to save a checkpoint and end after the
current optimizer step, so `--resume` continues from there.

It does not know where the events go or who asked to stop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback


class ProgressReporter(TrainerCallback):
    def __init__(self, report: Callable[[dict], None]):
        self.report = report
        self._t0: float | None = None
        self._step0 = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0, self._step0 = time.monotonic(), state.global_step
        self.report({"event": "start", "step": state.global_step, "total": state.max_steps})

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        event = {"event": "progress", "step": state.global_step, "total": state.max_steps,
                 "epoch": round(state.epoch or 0.0, 3)}
        for key in ("loss", "eval_loss", "learning_rate", "grad_norm"):
            if key in logs:
                event[key] = float(logs[key])
        done = state.global_step - self._step0
        if self._t0 is not None and done > 0:
            per_step = (time.monotonic() - self._t0) / done
            event["eta_s"] = round(per_step * max(state.max_steps - state.global_step, 0), 1)
        self.report(event)


class StopAtSafePoint(TrainerCallback):
    """When `event` is set: save a checkpoint after the current step and stop."""

    def __init__(self, event: threading.Event | None):
        self.event = event
        self.stopped = False

    def on_step_end(self, args, state, control, **kwargs):
        if self.event is not None and self.event.is_set():
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True
        return control


class LossBar(ProgressCallback):
    """transformers' tqdm bar (steps, rate, ETA) with the latest loss in its postfix instead of printed dicts."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {k: f"{logs[k]:.4f}" for k in ("loss", "eval_loss") if k in logs}
            if shown:
                self.training_bar.set_postfix(shown, refresh=False)
