"""Run scripts/train.py's main in this process, but SIGKILL it at one chosen moment (for the crash tests).

usage: python tests/kill_at.py MOMENT TRAIN_ARGS...   MOMENT: train-step-N | validation-epoch-N | ckpt-write-N
(N: a global step, or a 1-based epoch). The kill is a real SIGKILL: no cleanup, no Python exit handlers.
"""

import os
import signal
import sys

from mnist_lit import checkpoint_io, module, train


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(moment: str) -> None:
    kind, n = moment.rsplit("-", 1)
    n = int(n)
    lit = module.MNISTLitModule
    if kind == "train-step":
        original_train = lit.training_step

        def training_step(self, batch, batch_idx):
            if self.global_step == n:
                die()
            return original_train(self, batch, batch_idx)

        lit.training_step = training_step
    elif kind == "validation-epoch":
        original_val = lit.validation_step

        def validation_step(self, batch, batch_idx):
            if self.current_epoch + 1 == n:
                die()
            return original_val(self, batch, batch_idx)

        lit.validation_step = validation_step
    elif kind == "ckpt-write":
        io = checkpoint_io.RunCheckpointIO
        original_save = io.save_checkpoint

        def save_checkpoint(self, checkpoint, path, storage_options=None):
            if checkpoint["epoch"] + 1 == n:  # write the temporary file, then die before the rename
                super(io, self).save_checkpoint(checkpoint, f"{path}.part", storage_options)
                die()
            return original_save(self, checkpoint, path, storage_options)

        io.save_checkpoint = save_checkpoint
    else:
        raise SystemExit(f"unknown moment {moment}")


if __name__ == "__main__":
    arm(sys.argv[1])
    sys.exit(train.main(sys.argv[2:]))
