"""The producer side of vLLM's disaggregated encoding (EPD) with glm4v-fast as the encoder.

vLLM's `ECExampleConnector` (ec_role "ec_consumer", `ec_connector_extra_config={"shared_storage_path": DIR}`)
loads an item's encoder output from `DIR/<identifier>/encoder_cache.safetensors`, tensor "ec_cache" of shape
(tokens, out_hidden) in the model's dtype, and then runs no vision tower for it. When the client gives
`multi_modal_uuids`, the identifier is that UUID. `ECProducer` writes exactly that layout, so embeddings computed by
glm4v-fast (offline, by a batch job, or by `glm4v-fast serve`) reach vLLM through a shared folder:

    producer = ECProducer("/shared/ec", dtype=torch.bfloat16)
    producer.put("img-42", embedding)                       # (tokens, 4096) for one image
    llm.generate({"prompt": ..., "multi_modal_data": {"image": img}, "multi_modal_uuids": {"image": ["img-42"]}})
"""
from __future__ import annotations

import os
import re
import tempfile
from typing import Iterable

import torch

FILE_NAME = "encoder_cache.safetensors"
TENSOR_NAME = "ec_cache"
# An identifier becomes a folder name: no separators, no "..", nothing hidden.
_SAFE_ID = re.compile(r"^[A-Za-z0-9_\-.:]+$")


def _umask() -> int:
    """The process's umask: from /proc on Linux (reading it with os.umask means setting it, racy under threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class ECProducer:
    """Writes embeddings where vLLM's ECExampleConnector consumer reads them."""

    def __init__(self, storage_path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16):
        self.storage_path = os.fspath(storage_path)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype (the served model's dtype), got {dtype!r}")
        self.dtype = dtype
        os.makedirs(self.storage_path, exist_ok=True)

    def path_for(self, identifier: str) -> str:
        if not isinstance(identifier, str) or not _SAFE_ID.match(identifier) or identifier in (".", ".."):
            raise ValueError(f"identifier {identifier!r} cannot name a folder: use letters, digits and _-.: only")
        return os.path.join(self.storage_path, identifier, FILE_NAME)

    def put(self, identifier: str, embedding: torch.Tensor) -> str:
        """Store one item's (tokens, out_hidden) embedding; returns the file written.

        Written to a temporary file and renamed, so a consumer polling for the file never reads half of it.
        """
        from safetensors.torch import save_file

        if not isinstance(embedding, torch.Tensor) or embedding.dim() != 2:
            raise ValueError(f"embedding must be a 2-D (tokens, out_hidden) tensor, got "
                             f"{getattr(embedding, 'shape', type(embedding).__name__)}")
        path = self.path_for(identifier)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tensor = embedding.detach().to("cpu", self.dtype).contiguous()
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        os.close(fd)
        try:
            save_file({TENSOR_NAME: tensor}, tmp)
            # mkstemp creates the file 0600; the file gets the mode a plain open() would (0666 less the umask),
            # as its folders do, so that a consumer running as another user can read it where the umask allows.
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    def put_many(self, identifiers: Iterable[str], embeddings: Iterable[torch.Tensor]) -> list[str]:
        identifiers, embeddings = list(identifiers), list(embeddings)
        if len(identifiers) != len(embeddings):
            raise ValueError(f"{len(identifiers)} identifiers for {len(embeddings)} embeddings")
        return [self.put(i, e) for i, e in zip(identifiers, embeddings)]

    def has(self, identifier: str) -> bool:
        return os.path.exists(self.path_for(identifier))
