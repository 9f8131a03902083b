"""Model folders on disk: lazy per-tensor reads, atomic sharded writes, fingerprints.

Every command reads and writes models through this module, so the rules live here once:
- Hugging Face folders with ``model.safetensors`` or shards + ``model.safetensors.index.json``
  are read lazily, one tensor at a time, by name, with positioned reads into a fresh buffer:
  unlike a memory map, pages already read do not stay in the process's resident memory, so
  peak RSS is a few tensors. Only files the index names are read (stale shards are ignored).
- Pickle checkpoints (``*.bin``, ``*.pt``) are refused unless ``allow_pickle``; then they load
  with ``torch.load(weights_only=True)``, which never runs code from the file.
- Tied embeddings: a model with ``tie_word_embeddings`` may store no ``lm_head.weight``;
  ``ModelReader.get`` resolves such a name to the embedding it is tied to.
- Outputs are written into a hidden temporary folder next to the target and renamed into place
  only when complete. The writer is given the layout (names, shapes, dtypes) up front, so each
  shard's header is written first and every tensor goes straight to its place on disk.
"""

from omotool.io.formats import (
    DEFAULT_SHARD_SIZE,
    MODEL_FILES,
    PICKLE_INDEX,
    PICKLE_SINGLES,
    SAFE_INDEX,
    SAFE_SINGLE,
    TIED_HEADS,
    TensorLayout,
)
from omotool.io.reader import ModelReader, SafetensorsFile, fingerprint, resolve_model_path
from omotool.io.writer import ModelWriter, check_output

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "MODEL_FILES",
    "PICKLE_INDEX",
    "PICKLE_SINGLES",
    "SAFE_INDEX",
    "SAFE_SINGLE",
    "TIED_HEADS",
    "ModelReader",
    "ModelWriter",
    "SafetensorsFile",
    "TensorLayout",
    "check_output",
    "fingerprint",
    "resolve_model_path",
]
