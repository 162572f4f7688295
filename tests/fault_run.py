"""
Run a training script with a fault planted, for the tests: the trainer has no fault hook of its own, so this
helper monkeypatches it before the script starts.

    python tests/fault_run.py kill_after_step:3 train_baseline_gpt2.py --preset tiny ...
    python -m torch.distributed.run --nproc_per_node=2 tests/fault_run.py nan_loss:3 train_baseline_gpt2.py ...

Faults (K: an optimizer step):
    kill_after_step:K     die like kill -9 once step K is done (logged, and checkpointed if K is a checkpoint step)
    kill_in_checkpoint:K  die like kill -9 while writing the step-K checkpoint: half of it in checkpoint.pt.tmp
    nan_loss:K            the loss of step K is NaN, its gradient finite, once (a skipped step K runs again)

In-process tests plant the same faults with plant(fault, monkeypatch.setattr, die=...).
"""

import os
import runpy
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def kill_like_kill_9():
    os.kill(os.getpid(), signal.SIGKILL)


def plant(fault, patch=setattr, die=kill_like_kill_9):
    """Monkeypatch the trainer (patch(obj, name, value): setattr, or pytest's monkeypatch.setattr) so that
    `fault` ("kind:K") happens; die() is how the process dies."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import base_trainer
    import checkpoint
    kind, step = fault.split(":")
    step = int(step)
    if kind == "kill_after_step":
        # should_stop() is where the loop looks for signals, after the step's row and checkpoint: a kill -9
        # arriving between two steps.
        should_stop = base_trainer.BaseTrainer.should_stop

        def dying_should_stop(self):
            if self.step == step:
                die()
            return should_stop(self)
        patch(base_trainer.BaseTrainer, "should_stop", dying_should_stop)
    elif kind == "kill_in_checkpoint":
        write_checkpoint = checkpoint.write_checkpoint

        def dying_write(path, ckpt):
            if ckpt["step"] != step:
                return write_checkpoint(path, ckpt)
            import io
            import torch
            buffer = io.BytesIO()
            torch.save(ckpt, buffer)
            data = buffer.getvalue()
            with open(path + ".tmp", "wb") as f:  # the temporary file atomic_write would be writing
                f.write(data[: len(data) // 2])
            die()
        patch(checkpoint, "write_checkpoint", dying_write)
    elif kind == "nan_loss":
        train_step = base_trainer.BaseTrainer.train_step

        def poisoned_train_step(self):
            if self.step != step or self.nonfinite_skipped:
                return train_step(self)
            inner = getattr(self.step_module, "module", self.step_module)  # inside DDP's wrapper, if any
            # + nan: the loss is NaN but its gradient is not (d(loss + c)/d loss = 1), so that the guard is seen to
            # check the loss itself, not only the gradient norm
            hook = inner.register_forward_hook(lambda module, args, out: (out[0] + float("nan"), out[1]))
            try:
                return train_step(self)
            finally:
                hook.remove()
        patch(base_trainer.BaseTrainer, "train_step", poisoned_train_step)
    else:
        raise ValueError(f"unknown fault {fault!r}: kill_after_step:K, kill_in_checkpoint:K or nan_loss:K")


def main():
    fault, script, *args = sys.argv[1:]
    plant(fault)
    sys.argv = [str(REPO / script), *args]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
