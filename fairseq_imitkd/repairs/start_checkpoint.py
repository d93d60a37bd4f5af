"""A run that starts from a student trained with other dictionaries is refused, naming both.

A run that resumes (``checkpoint_last.pt``, ``--restore-file``) or continues (``--finetune-from-model``) a
student loads its weights in fairseq's ``Trainer.load_checkpoint`` (``fairseq/trainer.py``, ve-fairseq
0.12.3) with no look at the dictionaries the data was binarized with: where the embedding sizes agree, it
loads the embeddings against the wrong symbols silently; where they differ, it turns the size mismatch into
"Cannot load model parameters from checkpoint ...; please ensure that the architectures match.", which
names neither dictionary. :func:`check_start_checkpoint` compares first, before the model is loaded, with the
dictionary fingerprints the ``distillation`` task saves in ``task_state`` (under :data:`DICTIONARIES`), or
the embedding sizes where a checkpoint has none.

Proved by ``tests/test_teacher_checks.py::test_continuing_a_student_on_data_of_another_dictionary_is_named``
(another size) and ``::test_a_student_checkpoint_records_its_dictionaries`` (the same size, another order).
"""
import os

from ..errors import ImitKDError
from .checkpoint_loading import read_checkpoint_lazily
from .task_state_on_resume import resume_path

#: where the task saves its dictionaries' fingerprints in ``task_state``
DICTIONARIES = "dictionaries"


def check_start_checkpoint(cfg, dictionaries: dict) -> None:
    """Refuse the checkpoint this run starts from (resumed, else ``--finetune-from-model``) where it was trained
    with other dictionaries than ``dictionaries`` (``{"src": fingerprint, "tgt": fingerprint}``) for the data
    in ``cfg.data``; nothing to check for a fresh run."""
    path = resume_path(cfg)
    if not os.path.isfile(path):
        path = cfg.finetune_from_model
    if not path or not os.path.isfile(path):
        return
    state = read_checkpoint_lazily(path)
    saved = (state.get("task_state") or {}).get(DICTIONARIES, {})
    weights = state.get("model", {})
    for side, name, key in (("source", "src", "encoder.embed_tokens.weight"),
                            ("target", "tgt", "decoder.embed_tokens.weight")):
        here = dictionaries[name]
        there = saved.get(name) or ({"size": weights[key].shape[0]} if key in weights else None)
        if there is None or all(there[k] == here[k] for k in there):
            continue
        what = (f"a {side} dictionary of {there['size']} symbols, but {cfg.data} has {here['size']}"
                if there["size"] != here["size"] else
                f"another {side} dictionary than {cfg.data} (the same size, other symbols or order)")
        raise ImitKDError(
            f"{path} was trained with {what}: binarize the data with the dictionaries that model was trained "
            "with (fairseq-preprocess --srcdict/--tgtdict; fairseq checkpoints hold none)")
