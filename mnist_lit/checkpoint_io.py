"""A run's checkpoint files, through Lightning's CheckpointIO plugin: written atomically, read as data (also
Lightning's own reload of ``ckpt_path``), and removed only inside the run's own checkpoints folder."""

import logging
import os
from pathlib import Path

from pytorch_lightning.plugins.io import TorchCheckpointIO

from mnist_lit.checkpoint_file import load_checkpoint
from mnist_lit.schema import shown

log = logging.getLogger("mnist_lit")


class RunCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O for one run, whose checkpoints go to ``folder``.

    Saves write a temporary file, flush it to disk, then rename it: a killed run never leaves a torn checkpoint.
    Loads (Lightning's reload of ``ckpt_path`` too) read a checkpoint as data (``checkpoint_file``). Removals
    (ModelCheckpoint replacing its previous file) delete only a plain file inside ``folder``: a path that came
    from elsewhere, such as a checkpoint's callback state, is never removed.
    """

    def __init__(self, folder: Path | None = None):
        super().__init__()
        self.folder = folder

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".part")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        tmp.replace(path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return load_checkpoint(path)  # weights_only=True, whatever the caller asks

    def remove_checkpoint(self, path) -> None:
        own = own_file(path, self.folder)
        if own is None:
            log.warning("not removed: %s is not a checkpoint file of this run", shown(path))
            return
        own.unlink()


def own_file(path, folder: Path | None) -> Path | None:
    """``path`` as a plain file directly inside ``folder``, or None: no protocol (``scheme://``), no ``..``, and
    resolved (links followed) an existing regular file whose folder is ``folder``."""
    if folder is None or not isinstance(path, (str, os.PathLike)):
        return None
    text = os.fspath(path)
    if not text or "://" in text or ".." in Path(text).parts:
        return None
    real = Path(text).resolve()
    return real if real.is_file() and real.parent == Path(folder).resolve() else None
